"""Run a clinkd_jax command with the model's answers scripted, to put any answer through the real command:

    python tests/scripted_answers.py ANSWERS.json clinkd_jax.predict --model=... --image=...

ANSWERS.json maps a key to an answer (a response as the model's decoded tokens would read). The model is loaded,
compiled and generates as in the command; then each decoded response (`eval.run.responses`, what predict, serve
and the evaluation read) is replaced by the answer of the first key found in its record's file name or question
("*": any record; no key found: the model's own answer). The answer "RAISE" raises a RuntimeError instead, standing
for a bug that strikes after the model has answered.
"""

import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clinkd_jax.eval import run as eval_run  # noqa: E402


def scripted(answers: dict):
    real = eval_run.responses

    def responses(tokens, recs, encoder, pcfg, n=1):
        texts = real(tokens, recs, encoder, pcfg, n)
        for i, r in enumerate(recs):
            where = os.path.basename(str(r.id)) + " " + r.question
            key = next((k for k in answers if k != "*" and k in where), "*" if "*" in answers else None)
            if key is None:
                continue
            if answers[key] == "RAISE":
                raise RuntimeError(f"scripted failure for {key!r}")
            texts[i * n:(i + 1) * n] = [answers[key]] * n
        return texts

    return responses


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        eval_run.responses = scripted(json.load(f))
    module, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
