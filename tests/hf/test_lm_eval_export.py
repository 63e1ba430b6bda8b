"""The STEM export evaluated by lm_eval's `hf` backend (AutoModelForCausalLM with
trust_remote_code, batches of 2, so padded) on two local tasks: task YAML over JSON files
written here, offline, nothing downloaded. Each log-likelihood (and whether the continuation
is greedy) and each greedy generation equals what our own model gives."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.generation import generate_ids

PROMPTS = ["ROMEO. What light", "And", "KING. My lord,"]  # unequal lengths: padded batches
GEN_TOKENS = 12
NEVER = "<never generated>"  # the stop string: each generation runs its GEN_TOKENS


def write_task(root: Path, name: str, rows: list[dict], **task) -> None:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "tasks").mkdir(exist_ok=True)
    (root / "tasks" / f"{name}.yaml").write_text(
        yaml.safe_dump(
            {
                "task": name,
                "dataset_path": "json",
                "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                **task,
            }
        )
    )


def our_loglikelihood(ours, context: str, continuation: str) -> tuple[float, bool]:
    """Split into tokens as lm_eval does (the continuation is what encoding the whole adds to
    the context's tokens): the summed log-probability and whether every token is the argmax."""
    whole = ours.tokenizer.encode(context + continuation)
    start = len(ours.tokenizer.encode(context))
    with torch.no_grad():
        logits = ours.model(torch.tensor([whole]))[0, :, : ours.model.spec.vocab_size]
    scores = logits[start - 1 : -1].float().log_softmax(-1)
    targets = torch.tensor(whole[start:])
    return (
        scores.gather(1, targets[:, None]).sum().item(),
        bool((scores.argmax(-1) == targets).all()),
    )


def test_lm_eval_hf_backend_scores_and_generates_as_our_model(
    trained_stem_export, parallel, tmp_path, monkeypatch
):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    ours = load_for_inference(str(trained_stem_export.run))
    vocab, seq = ours.model.spec.vocab_size, ours.config.model.seq_length

    def greedy_text(prompt: str, tokens: int) -> str:
        ids = ours.tokenizer.encode(prompt)
        return ours.tokenizer.decode(
            generate_ids(ours.model, ids, max_new_tokens=tokens, vocab_size=vocab, seq_length=seq)[
                len(ids) :
            ]
        )

    pairs = [(p, greedy_text(p, 4)) for p in PROMPTS] + [
        (p, " through yonder window") for p in PROMPTS
    ]
    write_task(
        tmp_path,
        "stem_loglikelihood",
        [{"context": c, "continuation": t} for c, t in pairs],
        output_type="loglikelihood",
        doc_to_text="{{context}}",
        doc_to_target="{{continuation}}",
        metric_list=[{"metric": "perplexity"}],
    )
    write_task(
        tmp_path,
        "stem_generation",
        [{"prompt": p} for p in PROMPTS],
        output_type="generate_until",
        doc_to_text="{{prompt}}",
        doc_to_target="",
        generation_kwargs={"until": [NEVER], "max_gen_toks": GEN_TOKENS, "do_sample": False},
        metric_list=[{"metric": "exact_match"}],
    )
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={trained_stem_export.hf_dir},trust_remote_code=True,dtype=float32",
        tasks=["stem_loglikelihood", "stem_generation"],
        device="cpu",
        batch_size=2,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
        bootstrap_iters=0,
    )

    scored = results["samples"]["stem_loglikelihood"]
    assert len(scored) == len(pairs)
    greedy_seen = False
    for sample in scored:
        ((theirs, theirs_greedy),) = sample["filtered_resps"]
        mine, mine_greedy = our_loglikelihood(
            ours, sample["doc"]["context"], sample["doc"]["continuation"]
        )
        print(
            f"{sample['doc']}: lm_eval {theirs:.5f} ({theirs_greedy}), ours {mine:.5f} "
            f"({mine_greedy})"
        )
        assert abs(theirs - mine) < 1e-3 and theirs_greedy == mine_greedy
        greedy_seen |= mine_greedy
    assert greedy_seen  # both outcomes of the greedy check occur (" through yonder" is not)
    generated = results["samples"]["stem_generation"]
    assert sorted(s["doc"]["prompt"] for s in generated) == sorted(PROMPTS)
    for sample in generated:
        expected = greedy_text(sample["doc"]["prompt"], GEN_TOKENS)
        print(f"{sample['doc']}: lm_eval {sample['filtered_resps'][0]!r}, ours {expected!r}")
        assert sample["filtered_resps"][0] == expected
