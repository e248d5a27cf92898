"""Per-document results of the number_words task: (log-likelihood, bytes of the words)."""


def process_results(doc: dict, results: list) -> dict:
    loglikelihood, _is_greedy = results[0]
    return {"bits_per_byte": (loglikelihood, len((" " + doc["words"]).encode("utf-8")))}
