"""Scoring functions, pure: predictions and references in, percentages (0-100) out.

Multiple choice: accuracy of the parsed letter, and option log-likelihood accuracy as
lm-evaluation-harness scores it. Question answering: SQuAD exact match and token F1 (max over
references), numeric exact match, corpus BLEU (sacrebleu) and ROUGE-1 / ROUGE-L F1 (rouge-score).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from dlp_lora.tasks.prompts import extract_number, normalize_text

__all__ = ["choice_accuracy", "exact_match", "token_f1", "numeric_match", "corpus_bleu", "rouge_scores", "score_task"]


def _check(preds: Sequence, refs: Sequence) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"expected as many predictions as references, got {len(preds)} and {len(refs)}")


def choice_accuracy(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Percent of predictions (letters) equal to their gold letter."""
    _check(preds, refs)
    return 100.0 * sum(p.strip().upper() in {r.upper() for r in rs} for p, rs in zip(preds, refs)) / max(len(preds), 1)


def _loose(text: str) -> str:
    """Case and whitespace folded, a trailing period dropped; punctuation kept (it is the answer in Dyck tasks)."""
    return " ".join(text.lower().split()).removesuffix(".").strip()


def exact_match(pred: str, refs: Sequence[str], squad: bool = True) -> float:
    """1.0 when the normalised prediction equals any normalised reference.

    squad=True uses SQuAD normalisation (drops punctuation and articles); False only folds case and spaces.
    """
    norm = normalize_text if squad else _loose
    return float(any(norm(pred) == norm(r) for r in refs))


def token_f1(pred: str, refs: Sequence[str], squad: bool = True) -> float:
    """Token F1 (bag of normalised tokens, SQuAD style), max over references, in [0, 1]."""
    norm = normalize_text if squad else _loose

    def f1(a: str, b: str) -> float:
        pt, rt = norm(a).split(), norm(b).split()
        if not pt or not rt:
            return float(pt == rt)
        common = sum((Counter(pt) & Counter(rt)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pt), common / len(rt)
        return 2 * precision * recall / (precision + recall)

    return max(f1(pred, r) for r in refs)


def numeric_match(pred: str, refs: Sequence[str]) -> float:
    """1.0 when the number read from pred equals a reference number (commas and '.0' ignored)."""
    got = extract_number(pred)
    return float(bool(got) and any(got == extract_number(r) for r in refs))


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (13a tokenisation, one reference per hypothesis)."""
    import sacrebleu

    _check(hyps, refs)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def rouge_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 (rouge-score, Porter stemming), in percent."""
    from rouge_score import rouge_scorer

    _check(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rougeL": 0.0}
    for h, r in zip(hyps, refs):
        s = scorer.score(r, h)
        totals["rouge1"] += s["rouge1"].fmeasure
        totals["rougeL"] += s["rougeL"].fmeasure
    n = max(len(hyps), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


def score_task(
    metric: str,
    preds: Sequence[str],
    references: Sequence[Sequence[str]],
    texts: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
) -> dict[str, float]:
    """All scores of one task's predictions.

    preds are parsed answers (see `tasks.parse_answer`) and references the acceptable answers.
    For free-form metrics, BLEU and ROUGE compare the full generated `texts` with the training
    `targets` (e.g. the worked GSM8K solution) when given, else preds with the first reference.
    """
    _check(preds, references)
    if metric == "choice":
        return {"accuracy": choice_accuracy(preds, references)}
    if metric not in ("squad", "numeric", "exact"):
        raise ValueError(f"unknown metric {metric!r}; expected choice|squad|numeric|exact")
    n = max(len(preds), 1)
    squad = metric == "squad"
    if metric == "numeric":  # a number is right or wrong: token overlap means nothing here, so F1 = EM
        em = f1 = sum(numeric_match(p, r) for p, r in zip(preds, references))
    else:
        em = sum(exact_match(p, r, squad) for p, r in zip(preds, references))
        f1 = sum(token_f1(p, r, squad) for p, r in zip(preds, references))
    out = {"em": 100.0 * em / n, "f1": 100.0 * f1 / n}
    hyps = list(texts) if texts is not None else list(preds)
    golds = list(targets) if targets is not None else [r[0] for r in references]
    out["bleu"] = corpus_bleu(hyps, golds)
    out.update(rouge_scores(hyps, golds))
    return out
