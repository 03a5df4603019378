"""What one stage sets up once from its config and hands to what runs it (the training loop, evaluation, RCT,
pseudo-labels, aot): the mesh and its rules, the model's and the teacher's sources, the vocabulary, the chat
encoder and the data. Each concern lives in its own module (`sharding.run_mesh`, `model_source`, `data.dataset`);
this is where a stage meets them, once.

It sits below `train/`, `eval/` and `infer/` in the import graph: they import it, it imports none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax

from clinkd_jax import files, peft_adapters, settings, sharding
from clinkd_jax.data import dataset, pipeline, records, text
from clinkd_jax.data import vocab as vocab_lib
from clinkd_jax.model_source import ModelSource, same_inputs, tokenizer_dir
from clinkd_jax.models import lora as lora_lib
from clinkd_jax.models import quant
from clinkd_jax.models.qwen2vl import Qwen2VL

log = logging.getLogger("clinkd_jax.setup")


@dataclasses.dataclass
class StageContext:
    c: Any  # the stage's config
    workdir: str
    mesh: jax.sharding.Mesh
    rules: tuple
    model: ModelSource
    teacher: ModelSource | None  # the online teacher, the corrector, the pseudo-label writer's (None: none named)

    @classmethod
    def of(cls, c, workdir: str, devices=None) -> StageContext:
        """The stage `c` sets up in `workdir` on `devices` (default: all; a described TPU slice's for aot)."""
        mesh, rules = sharding.run_mesh(c, devices)
        return cls(c, workdir, mesh, rules, ModelSource.of(c, "model"), ModelSource.of(c, "teacher", required=False))

    @functools.cached_property
    def vocab_ids(self) -> tuple[int, ...] | None:
        """The token ids the model's embedding rows stand for (None: the full vocabulary): a checkpoint's own, or
        the compact vocabulary model.compact_vocab asks of a preset."""
        if self.model.kind != "preset":
            return self.model.geometry().vocab_ids
        return compact_vocab(self.c, self.workdir)

    @functools.cached_property
    def rows(self) -> tuple[int, int]:
        """The rows [start, stop) of every global batch that this process's devices hold: the rows it loads."""
        return sharding.process_rows(self.c.data.batch_size, self.mesh, self.rules)

    def load_base(self, dtype: str | None = None):
        """(geometry, params) of the model on the stage's mesh as its source holds them (`dtype`: None = a
        checkpoint's own): what a training run starts from (a LoRA run keeps lora.adapter_dir's adapters apart)."""
        return self.model.load(self.mesh, self.rules, self.c.seed, self.vocab_ids, dtype)

    def load_model(self, dtype: str | None = None):
        """`load_base`'s model with the PEFT adapter `lora.adapter_dir` folded in when one is named: what an
        evaluation, RCT or predict reads."""
        cfg, params = self.load_base(dtype)
        where = self.c.get("lora", {}).get("adapter_dir", "")
        if not where:
            return cfg, params
        lora, adapters = peft_adapters.load_peft(where, cfg)
        log.info("%s: a LoRA adapter of rank %d on %d layer groups, folded into the model", where, lora.rank,
                 len(lora.targets))
        plain = jax.tree.map(lambda x: x.sharding, params)
        # lora.base_quant: an adapter QLoRA trained is folded into the dequantised base it trained against
        q = quant.plan(self.module(cfg), self.c.get("lora", {}).get("base_quant", ""), lora_lib.quantised_layers(lora))
        params = quant.quantizer(q, q and q.shardings(plain))(params)
        return cfg, lora_lib.folder(lora, plain, q)(params, adapters)

    def load_teacher(self, student_cfg, what: str = "the teacher", seed_offset: int = 1):
        """(geometry, params) of config.teacher, checked to read the student's batches as the student does."""
        cfg, params = self.teacher.load(self.mesh, self.rules, self.c.seed + seed_offset, student_cfg.vocab_ids)
        same_inputs(student_cfg, cfg, what)
        return cfg, params

    def module(self, cfg, dtype: str | None = None, **training) -> Qwen2VL:
        """The module for geometry `cfg` as the stage's config sets it up (`settings.model_module`)."""
        return settings.model_module(self.c, cfg, dtype, **training)

    @functools.cached_property
    def tokenizer_dir(self) -> str:
        """Where the stage's tokenizer files are (`model_source.tokenizer_dir`); saved beside trained params."""
        return tokenizer_dir(self.c)

    @functools.cached_property
    def encoder(self) -> text.ChatEncoder:
        """The chat encoder of the stage: its tokenizer (mapped to the model's vocabulary rows) and template."""
        return encoder_for(self.c, self.vocab_ids, self.tokenizer_dir)

    def training_records(self, skips) -> list:
        return dataset.training_records(self.c, self.workdir, skips)

    def pipeline_config(self, model_cfg, **changes):
        return dataset.pipeline_config(self.c, (self.encoder.image_pad_id, self.encoder.pad_id), model_cfg,
                                       self.rows, **changes)

    def device_batch(self, batch: dict, with_records: bool = False) -> dict:
        """This host's rows -> the step's global arrays; `with_records`: with each row's record_index (sampling)."""
        return pipeline.device_batch(batch, self.mesh, self.rules, self.c.data.batch_size, with_records)


def encoder_for(c, vocab_ids=None, tokenizer: str = "") -> text.ChatEncoder:
    """The chat encoder of run config `c`: its tokenizer (from `tokenizer`, else as `tokenizer_dir(c)` finds it;
    mapped to `vocab_ids` rows) and template."""
    tok = vocab_lib.tokenizer_for(text.load_tokenizer(tokenizer or tokenizer_dir(c)), vocab_ids)
    return text.ChatEncoder(tok, c.data.chat_template or None, box_markup=c.data.box_markup)


def compact_vocab(c, workdir) -> tuple[int, ...] | None:
    """The vocabulary ids `model.compact_vocab` asks for (None: full); only a preset model is compacted.
    "data": every id the training records and the eval test files encode to (clinkd_jax.data.vocab)."""
    want = c.model.compact_vocab
    if not want or not settings.is_preset(c):
        return None
    tok = text.load_tokenizer(tokenizer_dir(c))
    if want != "data":
        with open(want) as f:
            return vocab_lib.build_ids(tok, json.load(f))
    quiet = records.SkipLog(strict=False)  # the stage's own reading reports skips
    has_train = c.data.format == "demo" or any(c.data.train_files)  # an eval-only config may have none
    recs = (dataset.training_records(c, workdir, quiet) if has_train else []) + [
        r for f in dataset.test_files(c, workdir).values() if os.path.isfile(f)
        for r in dataset.eval_records(c, f, workdir, quiet)]
    encoder = text.ChatEncoder(tok, c.data.chat_template or None)
    used = {int(i) for r in recs for i in encoder.encode(r.turns, [1] * len(r.images)).input_ids}
    ids = vocab_lib.build_ids(tok, used)
    log.info("compact vocabulary: %d ids (%d used by %d records)", len(ids), len(used), len(recs))
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, "vocab_ids.json"), list(ids), indent=None)
    return ids
