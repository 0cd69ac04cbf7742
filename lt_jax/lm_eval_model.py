"""An lm-evaluation-harness model over `lt_jax.Model` under any plan, registered as `lt-jax` (needs the `lm-eval`
extra). Importing this module registers it; lm-eval finds no models outside its own package by itself, so run
lm-eval through this module:

    python -m lt_jax.lm_eval_model --model lt-jax --model_args pretrained=smollm2,plan=lighttransfer,window=1020 \\
        --tasks hellaswag --limit 100 --output_path results/lm_eval

(every `lm_eval` flag works), or from Python: `import lt_jax.lm_eval_model` then `lm_eval.simple_evaluate(model=
"lt-jax", model_args=...)`, or `simple_evaluate(model=LtJaxLM(model=lt_jax.load(...), plan=...))`.

Tokenization follows lm-eval's `hf` model (`TemplateLM._encode_pair`: the context's trailing spaces move to the
continuation; an empty context is the BOS token, else EOS), so per-request loglikelihoods compare with `hf`'s.
- `loglikelihood`: (context, continuation) scored teacher-forced (`scoring.token_logprobs`) under the plan with
  the context as an exact prefill and the continuation scored as decode steps would score it (`Model.logits`'
  prefix rule; a selecting plan chooses its lazy layers on the context). Rows are batched `batch_size` at a
  time per length bucket (padded rows and widths, so few compilations).
- `loglikelihood_rolling`: the text's disjoint windows of the model's context (lm-eval's rolling windows), summed.
- `generate_until`: `Model.generate_stream` (continuous batching) per group of equal sampling settings, cut at the
  first `until` string; `max_gen_toks` (default 256) per request.
"""
from __future__ import annotations

import sys

import numpy as np
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from lt_jax import scoring
from lt_jax.batching import bucket


@register_model("lt-jax")
class LtJaxLM(TemplateLM):
    backend = "causal"

    def __init__(self, pretrained: str | None = None, model=None, plan: str | None = None, batch_size=8,
                 max_gen_toks: int = 256, sink: int | None = None, window: int | None = None,
                 lazy_fraction: float | None = None, **ignored):  # device, max_batch_size: lm-eval's CLI passes them
        import lt_jax
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ValueError("give the lt-jax model as pretrained=PATH (or an asset name) or model=Model.")
        self.model = model if model is not None else lt_jax.load(pretrained)
        if self.model.tokenizer is None:
            raise ValueError(f"model {self.model.path} has no tokenizer; lm-eval needs one.")
        self.plan = self.model.plan(plan, sink=sink, window=window, lazy_fraction=lazy_fraction)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer = self.model.tokenizer

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of logprobs, whether every token is the argmax) of each row's last n tokens, for rows (ids, n)."""
        m, cfg = self.model, self.model.config
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, (ids, n) in enumerate(rows):
            plan, _ = m.select([ids[:len(ids) - n]], self.plan)
            groups.setdefault((min(bucket(len(ids)), cfg.max_position_embeddings), plan), []).append(i)
        for (width, plan), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                part = members[start:start + self.batch_size]
                tokens = np.zeros((self.batch_size, width), np.int32)
                prefix = np.ones(self.batch_size, np.int32)
                for r, i in enumerate(part):
                    ids, n = rows[i]
                    tokens[r, :len(ids)], prefix[r] = ids, len(ids) - n
                chosen, _, top = scoring.token_logprobs(m.params, m.rows(tokens), plan.layers(cfg), cfg,
                                                        m.rows(prefix))
                chosen, top = np.asarray(chosen), np.asarray(top)[..., 0]
                for r, i in enumerate(part):
                    ids, n = rows[i]
                    span = slice(len(ids) - 1 - n, len(ids) - 1)
                    out[i] = (float(chosen[r, span].astype(np.float64).sum()),
                              bool((top[r, span] == np.asarray(ids[-n:])).all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(self.max_length + 1):][-self.max_length:]
            rows.append((ids, len(continuation)))
        results = self._score(rows)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for i, req in enumerate(requests):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            for context, continuation in windows:
                rows.append((context + continuation, len(continuation)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(rows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.max_length - budget):]
            settings.append((ids, budget, until))
            groups.setdefault((temperature, float(kwargs.pop("top_p", 1.0))), []).append(i)
        out = [""] * len(requests)
        for (temperature, top_p), members in groups.items():
            results = self.model.generate_stream([settings[i][0] for i in members], self.plan,
                                                 batch_size=self.batch_size,
                                                 max_new_tokens=[settings[i][1] for i in members],
                                                 temperature=temperature, top_p=top_p)
            for r in results:
                i = members[r["index"]]
                out[i] = cut_at(r["text"], settings[i][2])
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def cut_at(text: str, until: list[str]) -> str:
    """The text before the first of the stop strings."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[:min(ends)] if ends else text


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate
    sys.exit(cli_evaluate())
