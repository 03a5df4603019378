"""Every knob of a clinkd_jax training run. Experiment configs import this and override fields;
the command line overrides any field: --config.optim.learning_rate=1e-5 --config.kd.mask=aligned"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.stage = "sft"  # sft (cross-entropy) | kd (ClinKD distillation from `teacher`) | rct (one correction round) | eval
    c.seed = 0
    # --- several stages in one run (clinkd_jax.recipe): names run in order, each in <workdir>/<name>/ with
    # this config updated by stage_settings.<name> (+ model_from / teacher_from: an earlier stage's params)
    c.stages = ()  # e.g. ("teacher", "kd", "sft", "eval"); () = one run of `stage`
    c.stage_settings = ConfigDict()

    # --- the student / the model being trained. Exactly one source: hf_dir, orbax_dir or preset.
    c.model = ConfigDict()
    c.model.hf_dir = ""  # a Hugging Face Qwen2-VL / Qwen2.5-VL directory (config.json + *.safetensors)
    c.model.orbax_dir = ""  # a clinkd_jax params checkpoint (python -m clinkd_jax.convert)
    # build from scratch: tiny | tiny_qwen | qwen2vl_2b | qwen2vl_7b | qwen2vl_72b | qwen2_5_vl_3b | qwen2_5_vl_7b |
    # qwen3_vl_2b | qwen3_vl_4b | qwen3_vl_8b
    c.model.preset = ""
    # the model family (qwen2_vl | qwen2_5_vl | qwen3_vl): a checkpoint's comes from its config.json (model_type)
    # and a value here must agree with it; with a preset, the preset's sizes with that family's vision tower (and,
    # for qwen3_vl, its LLM's q/k norms and DeepStack); "" = as given
    c.model.family = ""
    c.model.text_overrides = ConfigDict()  # with a preset: LLM fields to change, e.g. {"hidden_size": 128}
    c.model.vision_overrides = ConfigDict()  # with a preset: vision-tower fields to change, e.g. {"depth": 4}
    # with a preset: "data" = embedding/LM-head rows only for the token ids the training and test data use
    # (clinkd_jax.data.vocab; the demo's CPU speed-up); a JSON file of ids; "" = the full vocabulary.
    # A checkpoint's own vocabulary (model_config.json) always applies; the teacher shares the model's.
    c.model.compact_vocab = ""
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights (optimizer state is float32 too)
    c.model.attention = "xla"  # xla | jax | cudnn (GPU) | splash (TPU)
    # activations recomputed in the backward pass, per layer (least recompute first):
    # none | minimal | minimal_with_context | dots_saveable | full  (clinkd_jax.models.layers.maybe_remat)
    c.model.remat = "none"
    # moved to runtime.* (below): still read from here when set, with a warning, while runtime.* keeps its default
    c.model.scan_unroll = 1
    c.model.attention_loop = "auto"
    c.model.vision_query_block = 0
    c.model.decode_layers = "auto"

    # --- the teacher (stage "kd"): same sources; it shares the mesh, is never donated, has no optimizer state
    c.teacher = ConfigDict()
    c.teacher.hf_dir = ""
    c.teacher.orbax_dir = ""
    c.teacher.preset = ""
    c.teacher.family = ""  # as model.family, for the teacher
    c.teacher.text_overrides = ConfigDict()
    c.teacher.vision_overrides = ConfigDict()
    c.teacher.dtype = "bfloat16"
    c.teacher.positions = "shared"  # "shared": the student's MCG-RoPE ids (released) | "own": gaps (1, 1)

    # --- distillation loss (clinkd-spec §2.2 / §6); defaults reproduce the released code
    c.kd = ConfigDict()
    c.kd.alpha = 0.5
    c.kd.temperature = 0.5
    # released (unshifted labels: no KL on the prediction of an answer's first token) | aligned. At demo scale
    # the released mask cost KD students first-token decisions (task, object name); docs/recipe.md, the demo ablation
    c.kd.mask = "released"
    c.kd.reduction = "sum"  # sum (released) | mean
    c.kd.divergence = "forward"  # forward KL(teacher||student) | reverse
    c.kd.use_ce = True  # False: L = L_KD only
    # rows whose loss is computed together: the released per-device micro-batch (2; DDP averaged the devices'
    # losses), so the loss does not change with the data-parallel width; 0 = one sum over the whole global batch
    c.kd.sum_rows = 2
    # per-token KD weights w_t (clinkd-spec §2.4): "" = 1 (released) | "module:function" computing them from the
    # teacher's and student's log-probabilities in each loss chunk, e.g. clinkd_jax.train.losses:confidence_margin
    c.kd.token_weights = ""
    c.kd.pseudo_labels = ""  # a pseudo-label store (python -m clinkd_jax.train.pseudo_labels): no teacher forward
    c.kd.top_k = 64  # entries per token when writing pseudo-labels

    # --- data
    c.data = ConfigDict()
    c.data.format = "medgrit"  # medgrit | sharegpt | demo (generate the bundled demo set into the workdir)
    c.data.train_files = ("",)  # JSON files
    # format "demo": where the set is generated; "" = <workdir>/demo_data (recipes: <workdir>/demo_data)
    c.data.demo_dir = ""
    c.data.demo_train_per_image = 6  # format "demo": training conversations per source image (8 images)
    c.data.demo_test_per_image = 2  # format "demo": test items per source image and task
    # format "demo": where markers go: "random" (anywhere, any size) | "grid" (centred in a 3 x 3 cell, 2 sizes)
    c.data.demo_layout = "random"
    c.data.image_dir = ""
    # Med-GRIT ids name no file type: <image_dir>/<id><ext> for the first of these that exists (DICOM included)
    c.data.image_ext = (".png", ".dcm", ".dicom", ".jpg", ".jpeg")
    c.data.box_format = "auto"  # auto (told per file, logged) | 0-1000 (integers, Qwen2-VL) | 0-1 (floats)
    # the boxes the model is trained on and answers with: "0-1000" = Med-GRIT's markup (integers on a 0-1000 scale
    # between box tokens; ClinKD's, every family's default) | "absolute" = Qwen2.5-VL's own grounding convention
    # (pixels of the resized image the model sees) | "json" = Qwen3-VL's ({"bbox_2d": [0-1000 x4], "label": ...}).
    # Files, predictions and scores stay 0-1000 Med-GRIT tags whichever it is.
    c.data.box_markup = "0-1000"
    c.data.tokenizer = ""  # directory; default: the model's hf_dir, else the bundled Qwen2 tokenizer
    # "qwen2vl" (built in) | "qwen3vl" (built in: no default system turn) | "" (the tokenizer's own) | a Jinja text
    c.data.chat_template = "qwen2vl"
    c.data.batch_size = 2  # global batch (all hosts): rows of one step; each host loads the rows its devices hold
    c.data.text_buckets = (512, 1024, 2048)  # the last one is the cutoff (ClinKD: 2048)
    c.data.patch_buckets = (1024, 2304, 3136)  # per-sample patch slots; 768^2 px -> <= 2916 patches
    c.data.min_pixels = 32 * 32
    c.data.max_pixels = 768 * 768  # ClinKD training budget
    c.data.mrope_gaps = (2, 2)  # MCG-RoPE; (1, 1) = plain Qwen2-VL (the MCG ablation)
    c.data.num_epochs = 3  # 0 = repeat forever (then train.steps or train.total_steps_hint sets the length)
    c.data.shuffle = True
    # several conversations per row, packed once up to the largest text and patch buckets (no attention across
    # them, positions from 0 each): fewer padded positions per step. The CE mean is unchanged; the KD sum runs
    # over kd.sum_rows *packed* rows (kd.sum_rows=0 or kd.reduction="mean" keep it independent of packing)
    c.data.pack = False
    c.data.strict = False  # True: stop at the first bad item instead of skipping and counting
    c.data.extra_files = ()  # more training records (ShareGPT JSON, absolute image paths), e.g. RCT corrections
    c.data.extra_mode = "append"  # append | replace (drop the original records whose id the extra files correct)
    c.data.worker_count = 0
    c.data.read_threads = 2
    # measured record sizes (tokens, patches) the batch plan is made from; "" = <workdir>/data_sizes.json
    c.data.sizes_cache = ""

    # --- optimizer (ClinKD SFT: AdamW, lr 5e-5 cosine, no warmup, clip 1.0, wd 0, accumulation 8)
    c.optim = ConfigDict()
    c.optim.learning_rate = 5e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.end_lr_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.grad_accum = 8
    c.optim.mu_dtype = ""  # AdamW first moment's dtype: "" = float32 like the master weights | "bfloat16" (-2 B/param)
    c.optim.frozen = ("visual/.*",)  # vision tower + merger frozen (clinkd-spec §1.4)

    # --- loop
    c.train = ConfigDict()
    c.train.steps = -1  # micro-steps; -1 = until the data's epochs are done
    c.train.total_steps_hint = 10000  # schedule length when steps = -1 (optimizer updates)
    c.train.loss_chunk = 256  # sequence positions per LM-head chunk in the losses
    # "fused": the loss's gradient is computed chunk by chunk in its forward pass (no logits kept or recomputed)
    # | "autodiff": JAX differentiates the chunk loop, keeping each scored chunk's logits (a reference)
    c.train.loss_backward = "fused"
    c.train.log_every = 10
    c.train.progress = True

    c.checkpoint = ConfigDict()
    c.checkpoint.save_every = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = False  # also write the final student in the Hugging Face layout (<workdir>/export_hf)
    c.checkpoint.export_dtype = "bfloat16"  # stored dtype of that export (published Qwen2-VL checkpoints are bf16)
    # True: a checkpoint step is final when it holds commit_success.txt instead of after a directory rename
    # (set it for a workdir on a gcsfuse mount, where renaming a directory copies it; launch/tpu.sh does)
    c.checkpoint.commit_files = False
    c.checkpoint.save_params = True  # also write the final params alone (<workdir>/params): a teacher.orbax_dir

    # --- Reflective Correction Training (clinkd_jax.train.rct): rounds inside SFT (every_steps) or a stage "rct";
    #     corrector = teacher.* (else the model itself). Every constant here is ours: the paper gives none.
    c.rct = ConfigDict()
    c.rct.num_items = 256  # training exchanges the model answers per round (0 = all)
    c.rct.threshold = 0.5  # text answers less similar than this to the reference are flagged
    c.rct.similarity = "overlap"  # SASG similarity: overlap | rouge_l | box_iou | "module:function"
    c.rct.samples = 4  # corrector candidates per flagged item (SASG picks the closest to the reference)
    c.rct.temperature = 0.7
    c.rct.top_p = 0.9
    c.rct.max_new_tokens = 80
    c.rct.batch_size = 8  # prompts per generate call
    c.rct.hint = "\nReference answer: {reference}\nGive the answer in your own words, consistent with the reference."
    c.rct.seed = 0
    c.rct.every_steps = 0  # > 0: rounds inside an SFT run, after every this many steps (needs train.steps)
    c.rct.rounds = 1  # with every_steps: how many rounds at most

    # --- evaluation (stage "eval"): BiRD/ClinKD protocol (clinkd-spec §3.5-3.7); the model is `model.*`
    c.eval = ConfigDict()
    c.eval.data_dir = ""  # folder holding Test_VG.json, Test_RO.json, Test_GC.json, Test_MII.json
    c.eval.tasks = ("VG", "RO", "GC", "MII")  # which of them to run
    c.eval.files = ()  # explicit test files instead (task read from the name: ..._VG_..., Test_RO.json, ...)
    c.eval.image_dir = ""  # default: data.image_dir
    c.eval.predictions = ()  # score-only: existing prediction JSONL files (any system); no model is loaded
    c.eval.limit = 0  # > 0: only the first N items of each file (a quick look)
    # > 0 on an sft/kd stage: evaluate the current params (eval.tasks, eval.limit) after every this many steps;
    # the curve goes to <workdir>/eval_curve.jsonl (clinkd_jax.eval.during_training)
    c.eval.every_steps = 0
    c.eval.batch_size = 8  # prompts per generate call (global)
    c.eval.text_buckets = (256, 512, 1024, 2048)  # left-padded prompt lengths (one compile each)
    c.eval.patch_buckets = (1600, 2704, 4096, 5376)  # per-prompt patch slots; 1024^2 px -> <= 5329 patches
    c.eval.min_pixels = 512 * 512  # ClinKD evaluation budget; 0: the checkpoint's preprocessor_config.json's
    c.eval.max_pixels = 1024 * 1024  # (else its family's published one); docs/models.md
    c.eval.max_new_tokens = 80  # BiRD/ClinKD
    c.eval.max_new_tokens_mii = 100  # whole-image description
    c.eval.temperature = 0.0  # 0 = greedy (the protocol)
    c.eval.top_p = 1.0
    # > 1: SASG at test time, N sampled candidates, keep the most agreed-upon (not the paper's protocol)
    c.eval.sasg_samples = 0
    c.eval.sasg_temperature = 0.7  # our default; the paper gives none
    c.eval.sasg_top_p = 0.9  # our default
    c.eval.sasg_similarity = "overlap"  # overlap | rouge_l | box_iou | "module:function"
    c.eval.spice = True  # SPICE needs Java + Stanford CoreNLP 3.6.0 jars; reported as skipped when missing
    c.eval.gallery_per_modality = 4  # images per modality in <workdir>/gallery/<task>.html (0 = none)
    c.eval.threads = 4  # image loading threads

    # --- how the model runs on this machine: loops, layouts and unrolling that change speed and memory, not results
    c.runtime = ConfigDict()
    c.runtime.scan_unroll = 1  # decoder/ViT layers per scan iteration; >= the layer count: fully unrolled
    # attention "xla" (both towers; decode steps always batched): "per_head" = one (sample, KV head) pair at a
    # time (2-D matmuls, scores in cache, flash-style backward), "batched" = all pairs in one matmul,
    # "auto" = per_head on CPU (faster there, bench/history.md), batched elsewhere
    c.runtime.attention_loop = "auto"
    c.runtime.vision_query_block = 0  # vision attention query rows per block (bounds memory on big images); 0 = all
    # generation's one-token decode steps: "scan" = over the stacked layer weights as training does, "unrolled" =
    # the weights and KV cache laid out for decoding once per generate call (per-layer copies, LM head as rows,
    # a cache buffer per layer; no copy per token; costs a second copy of the decoder's weights while generating
    # and a decode-step compile time that grows with depth), "auto" = unrolled on CPU (faster there,
    # bench/history.md), scan elsewhere
    c.runtime.decode_layers = "auto"

    c.mesh = ConfigDict()
    c.mesh.rules = ()  # (logical axis, mesh axis | (axes) | None) pairs; () = clinkd_jax.sharding.DEFAULT_RULES
    c.mesh.shape = (1, -1, 1)  # data, fsdp, tensor; -1 = the remaining devices (without -1: the first devices)
    return c
