"""Does a candidate still answer like the original? KL, top-1 agreement, greedy match, perplexity.

Definitions (over the built-in chat prompts, or ``--prompts FILE``):
- the reference greedily continues each prompt by ``n_new`` (32) tokens;
- ``kl_mean``: mean over those positions of KL(reference || candidate) of the next-token
  distributions, teacher-forced on the reference's continuation (nats);
- ``top1_agreement``: share of those positions where the two argmaxes agree;
- ``greedy_match_tokens``: mean length of the common prefix when the candidate generates its own
  ``n_new`` greedy tokens;
- ``ppl`` / ``ppl_reference``: perplexity on the held-out English text shipped with the project.

The reference runs layer-major: each layer's weights are loaded once and applied to every
sequence, so verifying never holds a full float32 copy of the model.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from runtimes import rope
from runtimes.reference import KVCache, LayerWeights, decode_step_batched, layer_forward, rms_norm

from .errors import ExportError

log = logging.getLogger(__name__)
N_NEW = 32
PPL_WINDOW = 512


@dataclass
class Figures:
    kl_mean: float
    top1_agreement: float
    greedy_match_tokens: float
    prompts: int
    positions: int
    ppl: float | None = None
    ppl_reference: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# ---- built-in data -------------------------------------------------------------------------
def data_file(name: str) -> Path:
    return Path(str(resources.files("edge_export") / "data" / name))


def load_prompts(path: str | Path | None = None) -> list:
    """Prompts from JSONL: each line {"messages": [...]}, {"prompt": "..."} or a JSON string."""
    path = Path(path) if path else data_file("eval_prompts.jsonl")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: cannot read prompts ({e})") from e
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if isinstance(item, dict) and "messages" in item:
            prompts.append(item["messages"])
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
        elif isinstance(item, str):
            prompts.append(item)
        else:
            raise ExportError(f"{path}:{number}: expected {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}")
    if not prompts:
        raise ExportError(f"{path}: no prompts in the file; give one JSON object per line")
    return prompts


def heldout_ids(tokenizer, max_tokens: int = 4096) -> list[int]:
    return tokenizer.encode(data_file("heldout.txt").read_text(encoding="utf-8"), add_bos=False)[:max_tokens]


# ---- scorers ---------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))).astype(np.float32)


VOCAB_CHUNK_ELEMENTS = 1 << 24
HOLD_BYTES = 1 << 30  # models whose float32 weights fit in this are held, not re-read every step


class LayerMajorScorer:
    """Float32 numpy decoder over ``weights(name)``, run one layer at a time over every sequence.

    Small models (float32 under HOLD_BYTES) keep their weights after first use; larger ones re-read
    each layer when it is needed, so memory stays at about one layer.
    """

    def __init__(self, spec, weights, hold: bool | None = None, rows=None):
        self.spec = spec
        if hold is None:
            hold = spec.parameter_count * 4 <= HOLD_BYTES
        self.hold = hold
        self.weights = memoize(weights) if hold else weights
        # rows(name, slice) reads part of a tensor (a Checkpoint's tensor does): embeddings are
        # gathered and lm_head applied a vocabulary chunk at a time instead of whole in float32
        self.rows = None if hold else rows

    def _global(self, key: str) -> np.ndarray:
        name = self.spec.tensor_name("embed" if key == "lm_head" and self.spec.tied_embeddings else key)
        return self.weights(name)

    def _head(self, hs: list[np.ndarray]) -> list[np.ndarray]:
        norm = self._global("final_norm")
        xs = [rms_norm(h, norm, self.spec.rms_norm_eps) for h in hs]
        if self.rows is None:
            head = self._global("lm_head")
            return [x @ head.T for x in xs]
        name = self.spec.tensor_name("embed" if self.spec.tied_embeddings else "lm_head")
        out = [np.empty((x.shape[0], self.spec.vocab_size), np.float32) for x in xs]
        step = max(1, VOCAB_CHUNK_ELEMENTS // self.spec.hidden_size)
        for start in range(0, self.spec.vocab_size, step):
            chunk = self.rows(name, slice(start, start + step))
            for x, o in zip(xs, out):
                o[:, start:start + step] = x @ chunk.T
        return out

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        if self.rows is None:
            return self._global("embed")[ids]
        used, where = np.unique(np.asarray(ids), return_inverse=True)
        return self.rows(self.spec.tensor_name("embed"), used)[where]

    def _tables(self, lengths: list[int], starts: list[int]) -> list:
        return [rope.Rope.for_spec(self.spec).tables(np.arange(s, s + n))
                for n, s in zip(lengths, starts)]

    def _run(self, chunks: list[np.ndarray], caches: list[KVCache] | None, starts: list[int]) -> list[np.ndarray]:
        hs = [self._embed(c) for c in chunks]
        tables = self._tables([len(c) for c in chunks], starts)
        for i in range(self.spec.num_layers):
            lw = LayerWeights.load(self.spec, i, self.weights)
            hs = [layer_forward(self.spec, lw, h, cos, sin, caches[j] if caches else None, i, starts[j])
                  for j, (h, (cos, sin)) in enumerate(zip(hs, tables))]
        return hs

    def _step(self, tokens: list[int], caches: list[KVCache], starts: list[int]) -> np.ndarray:
        """One new token per sequence, all sequences batched through each layer; logits [B, vocab]."""
        h = self._embed(np.asarray(tokens))
        tables = self._tables([1] * len(tokens), starts)
        for i in range(self.spec.num_layers):
            h = decode_step_batched(self.spec, LayerWeights.load(self.spec, i, self.weights), h, tables, caches, i, starts)
        return self._head([h])[0]

    def sequence_logits(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """Logits [T, vocab] at every position of each sequence."""
        return self._head(self._run([np.asarray(s) for s in sequences], None, [0] * len(sequences)))

    def greedy(self, prompts: list[list[int]], n_new: int) -> tuple[list[list[int]], list[np.ndarray]]:
        """Each prompt's greedy continuation and the log-probs [n_new, vocab] that chose it."""
        caches = [KVCache(self.spec, len(p) + n_new) for p in prompts]
        hs = self._run([np.asarray(p) for p in prompts], caches, [0] * len(prompts))
        logits = self._head([np.concatenate([h[-1:] for h in hs])])[0]
        tokens, logprobs = [[] for _ in prompts], [[] for _ in prompts]
        for step in range(n_new):
            lp = log_softmax(logits)
            for j in range(len(prompts)):
                logprobs[j].append(lp[j])
                tokens[j].append(int(np.argmax(lp[j])))
            if step < n_new - 1:
                logits = self._step([t[-1] for t in tokens], caches, [len(p) + step for p in prompts])
        return tokens, [np.stack(lp) for lp in logprobs]

    def teacher_forced(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[np.ndarray]:
        """Log-probs [len(cont), vocab] predicting each continuation token after prompt + its prefix."""
        seqs = [p + c[:-1] for p, c in zip(prompts, continuations)]
        out = self.sequence_logits(seqs)
        return [log_softmax(lg[len(p) - 1:]) for lg, p in zip(out, prompts)]


class FixedReference:
    """A reference whose greedy pass already ran: its tokens and log-probs, so the model that made
    them need not be held while the candidate runs."""

    def __init__(self, tokens, logprobs):
        self.tokens, self.logprobs = tokens, logprobs

    def greedy(self, prompts, n_new):
        return self.tokens, self.logprobs


class RuntimeScorer:
    """Any runtime backend (prefill / decode) as a scorer, one sequence at a time.

    ``greedy_from_forcing``: its teacher forcing makes the very calls its greedy run makes, so up
    to the first position where its argmax leaves the reference's continuation the two have the same
    context and pick the same tokens: the greedy match is read off the teacher-forced argmaxes,
    without generating (compare)."""

    greedy_from_forcing = True

    def __init__(self, backend):
        self.backend = backend

    def teacher_forced(self, prompts, continuations) -> list[np.ndarray]:
        out = []
        for p, c in zip(prompts, continuations):
            rows = [self.backend.prefill(p)] + [self.backend.decode(t) for t in c[:-1]]
            out.append(log_softmax(np.stack(rows)))
        return out

    def greedy(self, prompts, n_new) -> tuple[list[list[int]], None]:
        tokens = []
        for p in prompts:
            logits, new = self.backend.prefill(p), []
            for step in range(n_new):
                new.append(int(np.argmax(logits)))
                if step < n_new - 1:
                    logits = self.backend.decode(new[-1])
            tokens.append(new)
        return tokens, None

    def sequence_logits(self, sequences) -> list[np.ndarray]:
        return [np.stack([self.backend.prefill(s[:1])] + [self.backend.decode(t) for t in s[1:]]) for s in sequences]


# ---- metrics -------------------------------------------------------------------------------
def compare(reference, candidate, prompts: list[list[int]], n_new: int = N_NEW) -> Figures:
    """Run the reference, then the candidate, on the same prompt ids. The candidate is scored one
    prompt at a time, or ``candidate.batch`` prompts at a time where it runs sequences together
    (the ML Program interpreter: one weight pass for all of them; a ``batched`` layer-major
    candidate takes every prompt in one pass over its layers), so only the reference's log-probs
    and a batch of the candidate's are held (a 150k vocabulary over 24 x 32 positions is 470 MB of
    float32 per copy). A candidate that declares ``greedy_from_forcing`` does not generate: its
    greedy match is where its teacher-forced argmaxes first leave the reference's tokens."""
    ref_tokens, ref_logprobs = reference.greedy(prompts, n_new)
    kls, agree, choices = [], [], []
    batch = len(prompts) if getattr(candidate, "batched", False) else max(1, int(getattr(candidate, "batch", 1)))
    for first in range(0, len(prompts), batch):
        part = slice(first, first + batch)
        for rl, cl in zip(ref_logprobs[part], candidate.teacher_forced(prompts[part], ref_tokens[part])):
            kls.extend((np.exp(rl.astype(np.float64)) * (rl - cl)).sum(axis=-1))
            agree.extend(rl.argmax(-1) == cl.argmax(-1))
            choices.append([int(c) for c in cl.argmax(-1)])
    if getattr(candidate, "greedy_from_forcing", False):
        # its greedy tokens equal its teacher-forced argmaxes up to the first one that misses
        matches = [_common_prefix(a, b) for a, b in zip(ref_tokens, choices)]
    else:
        cand_tokens, _ = candidate.greedy(prompts, n_new)
        matches = [_common_prefix(a, b) for a, b in zip(ref_tokens, cand_tokens)]
    return Figures(kl_mean=float(np.mean(kls)), top1_agreement=float(np.mean(agree)),
                   greedy_match_tokens=float(np.mean(matches)), prompts=len(prompts), positions=len(kls))


def perplexity(scorer, ids: list[int], window: int = PPL_WINDOW) -> float:
    """exp(mean NLL) of ids, in independent windows of ``window`` tokens."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        seq = ids[start:start + window]
        if len(seq) < 2:
            break
        lp = log_softmax(scorer.sequence_logits([seq])[0][:-1])
        nll -= float(lp[np.arange(len(seq) - 1), seq[1:]].sum())
        count += len(seq) - 1
    return float(np.exp(nll / max(count, 1)))


def memoize(weights):
    """``weights(name)`` that keeps each float32 tensor after its first read."""
    held: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in held:
            held[name] = np.asarray(weights(name), dtype=np.float32)
        return held[name]
    return get


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    return [tokenizer.encode_chat(p) for p in prompts]
