"""Train LLaVA (LLaVA-1.5 recipe), optionally with ToConv token compression.

Stage 1 (``--tune_mm_mlp_adapter True --version plain``) trains the projector, and the token
compressor with it, on image-caption pairs and writes ``mm_projector.bin``. Stage 2 (``--version
v1 --pretrain_mm_mlp_adapter .../mm_projector.bin``) fine-tunes the LLM (fully or with LoRA), the
projector and the compressor on instruction data. Run it as upstream LLaVA is run::

    python -m llava.train.train ARGS                              # one process
    torchrun --nproc_per_node 8 -m llava.train.train ARGS         # DDP
    deepspeed llava/train/train.py --deepspeed scripts/zero3.json ARGS

See ``docs/training.md`` and ``scripts/v1_5/``. ``train()`` is the library entry point;
``main(argv)`` is the CLI, which configures logging.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from llava.constants import CONFIG_DEFAULTS, NON_LORA_FILE
from llava.conversation import Conversation, SeparatorStyle, conv_templates
from llava.train import atomic

# Absolute imports: DeepSpeed's launcher runs this file as a script (deepspeed llava/train/train.py).
from llava.train.arguments import DataArguments, ModelArguments, TrainingArguments, parse_arguments
from llava.train.checkpointing import (
    COMPRESSOR_KEYS,
    PROJECTOR_KEYS,
    CheckpointError,
    checkpoint_problem,
    describe,
    find_all_linear_names,
    gather_state,
    gathered,
    get_peft_state_maybe_zero_3,
    grid_size_records,
    load_weights_file,
    matches,
    non_lora_trainables_state,
)
from llava.train.data import make_supervised_data_module
from llava.train.llava_trainer import LLaVATrainer

logger = logging.getLogger(__name__)

TRAIN_ARGS_FILE = "llava_train_args.json"
SUPPORTED_STYLES = (SeparatorStyle.PLAIN, SeparatorStyle.TWO)


def resolve_template(version: str) -> Conversation:
    """The conversation template of ``--version``; only ``plain`` and ``v1``-style templates can be trained."""
    if version not in conv_templates:
        raise ValueError(f"Unknown --version {version!r}; known: {', '.join(sorted(conv_templates))}.")
    template = conv_templates[version]
    if template.sep_style not in SUPPORTED_STYLES:
        raise NotImplementedError(
            f"--version {version!r} uses {template.sep_style.name}; this fork trains 'plain' (stage 1) and "
            f"'v1' (stage 2) style templates."
        )
    return template


def check_deepspeed_config(training_args: TrainingArguments) -> None:
    """Warn where a DeepSpeed config would silently override LLaVA's per-module learning rates."""
    config = training_args.deepspeed
    if not config:
        return
    if isinstance(config, str):
        config = json.loads(Path(config).read_text())
    per_module = {"mm_projector_lr": training_args.mm_projector_lr, "mm_vision_tower_lr": training_args.mm_vision_tower_lr}
    set_lrs = {k: v for k, v in per_module.items() if v is not None}
    if "optimizer" in config and set_lrs:
        logger.warning(
            "The DeepSpeed config defines its own optimizer, so %s will not apply; use scripts/zero2.json or "
            "scripts/zero3.json (no 'optimizer' section) to keep them.", ", ".join(sorted(set_lrs)),
        )


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def _quantization_kwargs(training_args: TrainingArguments) -> dict[str, Any]:
    """``from_pretrained`` kwargs for 4/8-bit loading (QLoRA); needs bitsandbytes."""
    if training_args.bits == 16:
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"--bits {training_args.bits} needs bitsandbytes (and a CUDA GPU): pip install bitsandbytes, "
            f"or train with --bits 16."
        ) from err
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=training_args.bits == 4,
        load_in_8bit=training_args.bits == 8,
        llm_int8_skip_modules=["mm_projector"],
        llm_int8_threshold=6.0,
        llm_int8_has_fp16_weight=False,
        bnb_4bit_compute_dtype=compute_dtype(training_args),
        bnb_4bit_use_double_quant=training_args.double_quant,
        bnb_4bit_quant_type=training_args.quant_type,
    )
    return {"quantization_config": config, "device_map": {"": training_args.device}}


def load_language_model(model_args: ModelArguments, training_args: TrainingArguments, attn_implementation: str | None):
    """The LLaVA causal LM (or a plain causal LM without ``--vision_tower``), ready for the vision modules."""
    kwargs: dict[str, Any] = {"cache_dir": training_args.cache_dir, **_quantization_kwargs(training_args)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if training_args.bf16:
        kwargs["dtype"] = torch.bfloat16
    if model_args.vision_tower:
        from llava.model import LlavaLlamaForCausalLM

        model = LlavaLlamaForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    model.config.use_cache = False
    return model


def load_tokenizer(model_args: ModelArguments, training_args: TrainingArguments):
    """The LLM's tokenizer, right-padded, with ``unk`` as the pad token (as LLaVA trains)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side=CONFIG_DEFAULTS["tokenizer_padding_side"],  # the side a config without the field means
    )
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token is None:
        raise ValueError(
            f"The tokenizer of {model_args.model_name_or_path} has neither an unk nor a pad token; add one."
        )
    return tokenizer


def _enable_input_grads(model) -> None:
    """With gradient checkpointing and a frozen embedding, the checkpointed blocks still need input grads."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return

    def make_inputs_require_grad(module, inputs, output):
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)


def apply_lora(model, training_args: TrainingArguments):
    """Wrap the LLM's linear layers in LoRA adapters (vision tower and projector excluded)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("--lora_enable True needs peft: pip install 'toconv-llava[train]'.") from err
    config = LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        target_modules=find_all_linear_names(model),
        lora_dropout=training_args.lora_dropout,
        bias=training_args.lora_bias,
        task_type="CAUSAL_LM",
    )
    if training_args.bits == 16 and (training_args.bf16 or training_args.fp16):
        model.to(compute_dtype(training_args))
    kinds = sorted({name.rsplit(".", 1)[-1] for name in config.target_modules})
    logger.info("Adding LoRA adapters (r=%d) to %d linear layers (%s)", config.r, len(config.target_modules), ", ".join(kinds))
    return get_peft_model(model, config)


def _adapter_check(model, path: str) -> None:
    """Confirm that the projector and compressor (with its grid-size record) hold ``path``'s weights; log them."""
    keys = PROJECTOR_KEYS + COMPRESSOR_KEYS
    saved = {_from_keyword(k, keys): t for k, t in read_adapter_file(path).items() if matches(k, keys)}
    live = gather_state((n, p) for n, p in model.named_parameters() if matches(n, keys))
    live = {_from_keyword(n, keys): t for n, t in {**live, **grid_size_records(model)}.items()}
    # Compare in the live dtype: setup_vision casts the tower (compressor included) to the compute
    # dtype after loading, so an fp32 stage-1 file and a bf16 stage 2 differ by that rounding alone.
    differs = [k for k, t in saved.items() if k not in live or not torch.equal(live[k], t.to(live[k].dtype))]
    if differs:
        raise RuntimeError(f"After loading {path}, these parameters do not hold its weights: {differs}.")
    logger.info("Started from %s (%s)", path, describe(saved))


def read_adapter_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of ``--pretrain_mm_mlp_adapter``; an empty or truncated file is an error saying what to do."""
    return load_weights_file(
        path,
        fix="Pass the mm_projector.bin of a finished stage 1, or of its latest checkpoint-N/, or rerun stage 1.",
    )


def _from_keyword(name: str, keywords: Sequence[str]) -> str:
    """``base_model.model.model.mm_projector.0.weight`` → ``mm_projector.0.weight``."""
    return name[min(name.index(k) for k in keywords if k in name):]


def setup_vision(
    model, tokenizer, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> None:
    """Build the vision tower, compressor and projector; choose what trains; add LLaVA's tokens."""
    if model_args.pretrain_mm_mlp_adapter:
        read_adapter_file(model_args.pretrain_mm_mlp_adapter)  # a clear error before the model reads it
    llava_model = model.get_model()
    existing = [p for name in ("mm_projector", "vision_tower") for p in _params_of(llava_model, name)]
    # Under ZeRO-3, a LLaVA checkpoint's vision modules are partitioned: gather them to load the adapter.
    with gathered(existing, modifier_rank=0):
        llava_model.initialize_vision_modules(model_args=model_args, fsdp=training_args.fsdp or None)
    vision_tower = model.get_vision_tower()
    vision_tower.to(dtype=compute_dtype(training_args), device=training_args.device)
    if model_args.pretrain_mm_mlp_adapter:
        _adapter_check(model, model_args.pretrain_mm_mlp_adapter)

    data_args.is_multimodal = True
    data_args.mm_use_im_start_end = model_args.mm_use_im_start_end
    config = model.config
    config.image_aspect_ratio = data_args.image_aspect_ratio
    config.image_grid_pinpoints = data_args.image_grid_pinpoints
    config.tokenizer_padding_side = tokenizer.padding_side
    config.tokenizer_model_max_length = tokenizer.model_max_length

    config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    projector = llava_model.mm_projector
    compressor = vision_tower.token_compressor
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        projector.requires_grad_(True)
        if compressor is not None:
            compressor.requires_grad_(True)
    config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
    if training_args.freeze_mm_mlp_adapter:
        projector.requires_grad_(False)
    if compressor is not None and model_args.freeze_token_compressor:
        compressor.requires_grad_(False)
    if compressor is not None and training_args.deepspeed:
        # DeepSpeed broadcasts parameters through byte views (param.data.view(torch.uint8): the
        # engine's initial broadcast under ZeRO-2, the partitioning under ZeRO-3), which fail on the
        # compressor's channels-last weight with "self.stride(-1) must be 1 to view Float as Byte".
        compressor.keep_weight_contiguous()
    if model_args.unfreeze_mm_vision_tower:
        vision_tower.vision_tower.requires_grad_(True)
        # Recorded so that loading the checkpoint restores the trained CLIP weights, not mm_vision_tower's.
        config.unfreeze_mm_vision_tower = True
    if training_args.bits in (4, 8):
        projector.to(dtype=compute_dtype(training_args), device=training_args.device)

    config.mm_use_im_start_end = model_args.mm_use_im_start_end
    config.mm_projector_lr = training_args.mm_projector_lr
    config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    model.initialize_vision_tokenizer(model_args, tokenizer=tokenizer)


def _params_of(module, name: str) -> list[torch.nn.Parameter]:
    child = getattr(module, name, None)
    if isinstance(child, list):
        child = child[0] if child else None
    return list(child.parameters()) if isinstance(child, torch.nn.Module) else []


def log_trainable(model) -> dict[str, int]:
    """Log (and return) how many parameters train, by part of the model."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = next((k for k in COMPRESSOR_KEYS + PROJECTOR_KEYS + ("vision_tower", "lora_") if k in name), "llm")
        # Under ZeRO-3 a partitioned parameter's local tensor is empty; ds_numel is its full size.
        counts[part] = counts.get(part, 0) + getattr(param, "ds_numel", param.numel())
    logger.info("Trainable parameters: %s", ", ".join(f"{k}={v:,}" for k, v in sorted(counts.items())) or "none")
    return counts


def save_arguments(output_dir: str, *groups: Any) -> None:
    """Write the resolved arguments beside the outputs (``llava_train_args.json``)."""
    record = {}
    for group in groups:
        values = group.to_dict() if hasattr(group, "to_dict") else dataclasses.asdict(group)
        record[type(group).__name__] = values
    atomic.write_text(Path(output_dir) / TRAIN_ARGS_FILE, json.dumps(record, indent=2, default=str) + "\n")


def save_trained_model(trainer: LLaVATrainer, model, tokenizer, training_args: TrainingArguments) -> None:
    """Write the final outputs: ``mm_projector.bin`` (stage 1), LoRA + ``non_lora_trainables.bin``, or the model.

    They are written into a hidden folder first and then moved into the output folder one file at
    a time (each move atomic), so a run killed while saving never leaves a truncated output file.
    """
    output_dir = training_args.output_dir
    model.config.use_cache = True
    staged = Path(output_dir) / f".final{atomic.PARTIAL_SUFFIX}"
    if training_args.should_save:
        atomic.remove_tree(staged)
    trainer.accelerator.wait_for_everyone()
    lora_state = non_lora_state = None
    if training_args.lora_enable and not trainer.tune_mm_mlp_adapter:
        lora_state = get_peft_state_maybe_zero_3(model.named_parameters(), training_args.lora_bias)
        non_lora_state = non_lora_trainables_state(model)
        if training_args.should_save:
            staged.mkdir(parents=True)
            model.config.save_pretrained(staged)
            model.save_pretrained(staged, state_dict=lora_state)
            torch.save(non_lora_state, staged / NON_LORA_FILE)
            tokenizer.save_pretrained(staged)
    else:
        trainer.save_model(str(staged))  # stage 1: mm_projector.bin (+ compressor, config); else the model
    trainer.accelerator.wait_for_everyone()
    if not training_args.should_save:
        return
    atomic.publish_files(staged, output_dir)
    if non_lora_state is not None:
        logger.info(
            "Saved LoRA weights (%d tensors) and %s (%d tensors: %s) to %s",
            len(lora_state), NON_LORA_FILE, len(non_lora_state), describe(non_lora_state), output_dir,
        )


def train(
    attn_implementation: str | None = None,
    argv: Sequence[str] | None = None,
    callbacks: Sequence[transformers.TrainerCallback] | None = None,
) -> LLaVATrainer:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, save; returns the trainer.

    Args:
        attn_implementation: Passed to ``from_pretrained`` (``"flash_attention_2"``, ``"sdpa"``, ...).
        argv: Command-line arguments (see ``llava.train.arguments``).
        callbacks: Extra ``TrainerCallback``s (tests use them to look at the model before training).
    """
    model_args, data_args, training_args = parse_arguments(list(argv) if argv is not None else None)
    template = resolve_template(model_args.version)
    check_deepspeed_config(training_args)
    resume_from = _resume_point(training_args, model_args)  # checks the checkpoint before anything loads
    if training_args.should_save:
        save_arguments(training_args.output_dir, model_args, data_args, training_args)
    seed_everything(training_args)

    model = prepare_language_model(model_args, training_args, attn_implementation)
    tokenizer = load_tokenizer(model_args, training_args)
    image_processor, image_token_count = None, None
    if model_args.vision_tower:
        setup_vision(model, tokenizer, model_args, data_args, training_args)
        vision_tower = model.get_vision_tower()
        image_processor = vision_tower.image_processor
        image_token_count = vision_tower.num_patches
    log_trainable(model)

    data_module = make_supervised_data_module(
        tokenizer, data_args, template, image_processor=image_processor,
        image_token_count=image_token_count, max_length=training_args.model_max_length,
    )
    trainer = LLaVATrainer(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        callbacks=list(callbacks or []),
        tune_mm_mlp_adapter=model_args.tune_mm_mlp_adapter,
        use_im_start_end=model_args.mm_use_im_start_end,
        **data_module,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_state()
    if trainer.data_skipped or data_module["train_dataset"].num_skipped:
        logger.warning(
            "Skipped %d broken samples during training (counted from the batches; see the warnings above).",
            trainer.data_skipped,
        )
    save_trained_model(trainer, model, tokenizer, training_args)
    return trainer


def prepare_language_model(model_args: ModelArguments, training_args: TrainingArguments,
                           attn_implementation: str | None):
    """The LLM, its backbone frozen, prepared for k-bit training and wrapped with LoRA as the flags ask."""
    model = load_language_model(model_args, training_args, attn_implementation)
    if model_args.freeze_backbone:
        model.model.requires_grad_(False)
    if training_args.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    if training_args.gradient_checkpointing:
        _enable_input_grads(model)
    if training_args.lora_enable:
        model = apply_lora(model, training_args)
    return model


def seed_everything(training_args: TrainingArguments) -> None:
    """Seed Python, NumPy and torch from ``--seed`` before any weight is created.

    The Trainer seeds only when it is constructed, after the model exists; LoRA's A matrices (and
    a new projector in stage 1) would otherwise start from whatever state the process began with
    (torch seeds itself from the OS), and two runs with the same ``--seed`` would differ.
    """
    if training_args.full_determinism:
        transformers.enable_full_determinism(training_args.seed)
    else:
        transformers.set_seed(training_args.seed)


def _checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, oldest step first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def _resume_point(training_args: TrainingArguments, model_args: ModelArguments) -> str | None:
    """Resume from ``--resume_from_checkpoint`` or, as upstream does, from the output folder's latest checkpoint.

    Only complete checkpoints count: newer ones that a killed run left incomplete are skipped with a
    warning naming them, and the temporaries it left are removed. An incomplete checkpoint given
    by ``--resume_from_checkpoint`` is an error. Stage-1 checkpoints hold only the adapter weights,
    so they are not resumed: start a new run with ``--pretrain_mm_mlp_adapter
    checkpoint-N/mm_projector.bin`` instead.
    """
    output_dir = Path(training_args.output_dir)
    if training_args.should_save:
        stale = atomic.remove_stale(output_dir)
        if stale:
            names = ", ".join(p.name for p in stale)
            logger.warning("Removed what an interrupted run left half-written in %s: %s", output_dir, names)
    if training_args.resume_from_checkpoint:
        given = training_args.resume_from_checkpoint
        if not Path(given).is_dir():
            raise CheckpointError(f"--resume_from_checkpoint {given} does not exist or is not a folder.")
        problem = checkpoint_problem(given)
        if problem is not None:
            raise CheckpointError(
                f"--resume_from_checkpoint {given} is incomplete: {problem} (its run was probably killed while "
                f"saving it). Resume from an earlier checkpoint-N."
            )
        return given
    checkpoints = _checkpoints(output_dir)
    if not checkpoints:
        return None
    if model_args.tune_mm_mlp_adapter:
        logger.warning(
            "%s holds stage-1 checkpoints (weights only); training starts from scratch. To continue one, pass "
            "--pretrain_mm_mlp_adapter <checkpoint>/mm_projector.bin.", output_dir,
        )
        return None
    skipped = []
    for checkpoint in reversed(checkpoints):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if skipped:
                logger.warning("Resuming from %s, the latest complete checkpoint.", checkpoint)
            return str(checkpoint)
        skipped.append(checkpoint)
        logger.warning("Skipping incomplete checkpoint %s: %s (its run was probably killed while saving it).",
                       checkpoint, problem)
    logger.warning("No complete checkpoint in %s; training starts from the beginning.", output_dir)
    return None


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr: ``level`` on the main process (rank 0), warnings only on the other ranks."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        level=level if rank == 0 else logging.WARNING,
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None, attn_implementation: str | None = None) -> None:
    """CLI entry point: ``python -m llava.train.train --model_name_or_path ... --output_dir ...``."""
    configure_logging()
    train(attn_implementation=attn_implementation, argv=argv)


if __name__ == "__main__":
    main()
