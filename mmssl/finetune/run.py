"""What `mmssl finetune` runs: build the zero-shot head, the labelled loader and the objective, hand
them to the training loop, then (rank 0) score the WiSE-FT curve."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from mmssl.errors import UserError


def finetune(args):
    """Fine-tune per the parsed `mmssl finetune` arguments; the TrainResult (None on ranks > 0)."""
    from mmssl.config import load_config
    from mmssl.train.distributed import init_distributed, shutdown
    from mmssl.train.policy import default_device, resolve_precision

    cfg = load_config(args.config, args.overrides)
    resolve_precision(cfg.train.precision, default_device())
    train_data = _shards_of(args.train, Path(args.out))
    finetune_cfg = cfg.finetune if args.objective is None else dataclasses.replace(cfg.finetune, objective=args.objective)
    cfg = dataclasses.replace(
        cfg, finetune=finetune_cfg,
        data=dataclasses.replace(cfg.data, train=train_data, val=args.val),
        train=dataclasses.replace(cfg.train, output=args.out),
    )
    env = init_distributed()
    finished = False
    try:
        trainer, start = build_finetuner(cfg, args, env)
        result = trainer.fit()
        if env.is_main and args.wise:
            from mmssl.finetune.curve import wise_curve

            wise_curve(start, trainer.objective, trainer.config_record, [args.val, *args.shift], args.wise, args.wise_alpha,
                       Path(args.out) / "wise", args.eval_batch_size, args.workers)
        finished = True
        return result if env.is_main else None
    finally:
        shutdown(env, together=finished)


def build_finetuner(cfg, args, env):
    """(Trainer, zero-shot start) for a resolved config: the start is the model's state dict and the
    zero-shot head before any step, the alpha = 0 end of WiSE-FT."""
    import mmssl
    from eval.embed import LoadedModel, open_eval_data
    from eval.zeroshot import build_classifier, class_prompt_texts, class_prompts
    from mmssl.config import to_dict
    from mmssl.data.train_loader import build_train_loader
    from mmssl.finetune.objective import FinetuneObjective
    from mmssl.models import image_transform
    from mmssl.models.factory import require_text_tower
    from mmssl.train.loop import Trainer, seed_everything
    from mmssl.train.policy import autocast, resolve_precision

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    precision = resolve_precision(cfg.train.precision, env.device)
    seed_everything(cfg.train.seed)
    m = cfg.model
    model = mmssl.create_model(args.checkpoint, lock_image=m.lock_image,
                               lock_image_unlocked_groups=m.lock_image_unlocked_groups,
                               grad_checkpointing=m.grad_checkpointing, patch_dropout=m.patch_dropout)
    require_text_tower(model, "mmssl finetune (its head starts as the zero-shot classifier)")
    model.to(env.device)
    eval_transform = image_transform(model, train=False)

    train_view = open_eval_data(cfg.data.train, eval_transform, 64, 0)
    first = _first_labelled_batch(train_view, cfg.data.train)
    classnames, templates = class_prompts(cfg.data.train, train_view, args.classnames, args.templates)
    if int(first.labels.max()) >= len(classnames):
        raise UserError(f"{cfg.data.train}: label {int(first.labels.max())} out of range for "
                        f"{len(classnames)} class names")
    val_view = open_eval_data(args.val, eval_transform, args.eval_batch_size, args.workers)
    if not (args.classnames or getattr(val_view, "benchmark", None)):
        try:
            val_names, _ = class_prompts(args.val, val_view)
        except UserError:
            val_names = None       # a val set without class files takes the training classes
        if val_names is not None and len(val_names) != len(classnames):
            raise UserError(f"class count mismatch: {args.train} has {len(classnames)} classes, "
                            f"{args.val} has {len(val_names)}")

    model.eval()
    with autocast(precision, env.device):
        class_vectors = build_classifier(model, model.tokenizer, classnames, templates).to(env.device)
    tokens = model.tokenizer(class_prompt_texts(classnames, templates)) if cfg.finetune.objective == "contrastive" else None
    objective = FinetuneObjective(model, class_vectors, cfg.finetune, prompt_tokens=tokens, templates=templates,
                                  precision=precision, rank=env.rank, world_size=env.world_size).to(env.device)
    start = {"model": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
             "head": objective.zeroshot_head, "classnames": classnames}

    size = model.visual.image_size
    side = max(size) if isinstance(size, (tuple, list)) else size
    loader = build_train_loader(cfg.data, transform=image_transform(model, train=cfg.data.augment), tokenizer=None,
                                batch_size=cfg.train.batch_size, seed=cfg.train.seed, rank=env.rank,
                                world_size=env.world_size, captions=False, labels=True,
                                decode_size=None if cfg.data.augment else side)
    loaded = LoadedModel(model, model.tokenizer, eval_transform, getattr(model, "model_name", "model"),
                         str(args.checkpoint), env.device, None)
    validate = _validation(objective, loaded, classnames, args) if cfg.train.val_every else None
    record = to_dict(cfg)
    record["model"] = to_dict(dataclasses.replace(model.model_config, pretrained=None))
    record["finetune"]["classnames"] = classnames
    record["finetune"]["source"] = str(args.checkpoint)
    trainer = Trainer(cfg.train, env, objective, loader, config_record=record, validate=validate)
    return trainer, start


def _validation(objective, loaded, classnames, args):
    """val/acc1 etc. of the head on --val at the loop's val_every steps."""
    from eval.classify import SavedClassifier, run_classify
    from mmssl.finetune.objective import HEAD

    def validate(model) -> dict:
        state = objective.heads_state_dict()[HEAD]      # FLYP's head is derived from the text tower here
        head = copy.deepcopy(objective.head).cpu().eval()
        head.load_state_dict({key: value.cpu() for key, value in state.items()})
        classifier = SavedClassifier(head, classnames)
        return run_classify(loaded, classifier, args.val, args.eval_batch_size, args.workers)["result"]["metrics"]

    return validate


def _shards_of(train: str, out: Path) -> str:
    """Training shards: `train` itself, or a class-folder tree sharded once into OUT/train_shards."""
    from eval.embed import _is_class_folder

    if not _is_class_folder(train):
        return train
    from data_prep.folder import prepare

    target = out / "train_shards"
    prepare(train, target, layout="classes", resume=(target / "manifest.json").exists(), quiet=True)
    return str(target)


def _first_labelled_batch(batches, data: str):
    """The data's first batch, or one clear error before training when it has no labels."""
    first = next(iter(batches), None)
    if first is None:
        raise UserError(f"{data}: no readable training samples")
    if first.labels is None:
        raise UserError(f"{data}: samples carry no class label (json 'label' or .cls); fine-tuning needs labels")
    return first
