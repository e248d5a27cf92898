"""Per-document results of the gsm8k_answers task: (log-likelihood, bytes of the answer)."""


def process_results(doc: dict, results: list) -> dict:
    loglikelihood, _is_greedy = results[0]
    return {"bits_per_byte": (loglikelihood, len((" " + doc["answer"]).encode("utf-8")))}


def process_question_results(doc: dict, results: list) -> dict:
    """Per-document results of the gsm8k_questions task: (log-likelihood, bytes of the question)."""
    loglikelihood, _is_greedy = results[0]
    return {"bits_per_byte": (loglikelihood, len((" " + doc["question"]).encode("utf-8")))}
