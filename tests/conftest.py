"""Shared fixtures: offline Hugging Face, a tiny tokenizer + Llama, tiny task data."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# Before any Hugging Face import: nothing reaches a hub or writes into the home cache.
_HF_HOME = tempfile.mkdtemp(prefix="cfs-test-hf-")
os.environ.update(
    HF_HOME=_HF_HOME,
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)

import pytest  # noqa: E402
import torch  # noqa: E402

from cfs_lightning.experiments.init_model import init_model

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare"
GSM8K = REPO / "data" / "gsm8k"

TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer x 32 Llama with a 512-token BPE trained on Shakespeare, random weights."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    init_model(str(out), [str(SHAKESPEARE / "train.txt")], vocab_size=512,
               model_config=TINY_LLAMA, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_task_files(tmp_path_factory) -> dict[str, str]:
    """64 GSM8K training records and 16 test records as jsonl files."""
    out = tmp_path_factory.mktemp("task")
    files = {}
    for split, n in (("train", 64), ("test", 16)):
        lines = (GSM8K / f"{split}.jsonl").read_text().splitlines()[:n]
        files[split] = str(out / f"{split}.jsonl")
        Path(files[split]).write_text("\n".join(lines) + "\n")
    return files


@pytest.fixture(scope="session")
def tiny_fisher_dir(tmp_path_factory, tiny_model_dir, tiny_replay_dir) -> Path:
    """The tiny model's diagonal Fisher on the first 8 of its replay sequences (`cfs fisher`)."""
    from cfs_lightning.loading import BaseModelArgs
    from cfs_lightning.replay.fisher import FisherOutput, fisher

    out = tmp_path_factory.mktemp("fisher") / "fisher"
    fisher(BaseModelArgs(str(tiny_model_dir), device="cpu"), str(tiny_replay_dir), FisherOutput(str(out)), sequences=8)
    return out


@pytest.fixture(scope="session")
def tiny_replay_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """40 context-free sequences sampled from the tiny model, with its top-8 log-probabilities."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfs_lightning.sampling import Budget, SamplingConfig
    from cfs_lightning.replay.context_free import generate_replay

    out = tmp_path_factory.mktemp("replay") / "cfs"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    generate_replay(model, tok, out, SamplingConfig(max_new_tokens=24, batch_size=16),
                    Budget(sequences=40), shard_size=16, store_topk=8)
    return out


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)


def make_eos_prone(model, eos_id: int, bias: float = 5.0):
    """Give the output head a bias towards EOS (in place), so that sampled responses end within a
    few tokens, as a trained model's do; with bias 5 about one step in five samples EOS."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos_id] = bias
    model.set_output_embeddings(biased)
    return model


@pytest.fixture(scope="session")
def tiny_task_shards(tmp_path_factory, tiny_model_dir, tiny_task_files) -> Path:
    """The tiny task's training split with high-perplexity tokens masked (task shards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfs_lightning.tasks import TaskSource
    from cfs_lightning.rewrite.token_mask import token_mask

    out = tmp_path_factory.mktemp("task_shards") / "stm"
    task = TaskSource(path="json", data_files=tiny_task_files, prompt="Question: {question}\nAnswer:",
                      response=" {answer}", max_length=512)
    token_mask(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
               task, out, tau=500.0)
    return out


CHAT_TEMPLATE = REPO / "configs" / "toy" / "base" / "chat_template.jinja"


@pytest.fixture(scope="session")
def tiny_dialogue_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """24 self-dialogues of the tiny model (replay shards with labels)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfs_lightning.sampling import SamplingConfig
    from cfs_lightning.replay.dialogue import self_dialogue

    out = tmp_path_factory.mktemp("dialogue") / "d"
    self_dialogue(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
                  ["the sea", "a king"], out, SamplingConfig(max_new_tokens=12, batch_size=8), 24,
                  chat_template=str(CHAT_TEMPLATE))
    return out
