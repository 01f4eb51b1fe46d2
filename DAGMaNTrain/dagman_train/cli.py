"""The ``dagman`` command line: configurations, pretraining, fine-tuning, export, inference, evaluation and the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("dagman")


def _config(arguments: argparse.Namespace) -> int:
    from dagman_core.config import load_config, mask_grid_tokens, preset_names

    if arguments.list:
        print("\n".join(preset_names()))
        return 0
    if not arguments.sources:
        raise ValueError(f"name a preset or a YAML file; presets: {', '.join(preset_names())}")
    config = load_config(*arguments.sources, overrides=arguments.overrides)
    if not arguments.json:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0

    from dagman_core.codistillation import parameter_counts

    report = {"config": config.to_dict(), "parameters": parameter_counts(config), "mask_grid_tokens": mask_grid_tokens(config)}
    print(json.dumps(report, indent=2))
    return 0


def _pretrain(arguments: argparse.Namespace) -> int:
    from dagman_core.config import load_config

    from .pretrain import pretrain

    if not arguments.config and not arguments.resume:
        raise ValueError("name a preset or YAML file with --config (or continue a run with --resume)")
    config = load_config(*arguments.config, overrides=arguments.overrides) if arguments.config else None
    summary = pretrain(config, arguments.datalist, arguments.output, arguments.max_steps, arguments.device, resume=arguments.resume)
    if "stopped" in summary:
        print(f"stopped by {summary['stopped']} after {summary['steps']} steps; continue with --resume")
    elif "seconds" in summary:
        print(f"pretrained {summary['steps']} steps in {summary['seconds']} s; run folder: {arguments.output}")
    return 0


def _finetune(arguments: argparse.Namespace) -> int:
    if arguments.task == "classification":
        return _finetune_classification(arguments)
    from .finetune import finetune_segmentation

    summary = finetune_segmentation(
        arguments.pretrained, arguments.datalist, arguments.output, arguments.max_steps, arguments.device,
        validate_every=arguments.validate_every,
    )
    if "seconds" not in summary:
        return 0
    print(f"fine-tuned {summary['steps']} steps in {summary['seconds']} s (final loss {summary['final_loss']:.4f}); run folder: {arguments.output}")
    return 0


def _finetune_classification(arguments: argparse.Namespace) -> int:
    from .classify import finetune_classification

    summary = finetune_classification(
        arguments.pretrained, arguments.datalist, arguments.output, mode=arguments.mode, pooling=arguments.pooling,
        folds=arguments.folds, fraction=arguments.fraction, steps=arguments.max_steps, lr=arguments.lr,
        batch_size=arguments.batch_size, crop_mode=arguments.crop, label_field=arguments.label_field,
        labels_csv=arguments.labels_csv, seed=arguments.seed, device=arguments.device,
    )
    cross_validation = summary.get("cross_validation")
    if cross_validation:
        low, high = cross_validation["auc_ci95"]
        print(f"{cross_validation['folds']}-fold cross-validation: AUC {cross_validation['auc']:.3f} (95 % CI {low:.3f}-{high:.3f}), "
              f"accuracy {cross_validation['accuracy']:.3f}")
    print(f"trained the {summary['mode']} classifier on {summary['training_data']['cases']} cases in {summary['seconds']} s; "
          f"run folder: {arguments.output}")
    return 0


def _evaluate(arguments: argparse.Namespace) -> int:
    from .evaluate import evaluate_model

    metrics = evaluate_model(
        arguments.model, arguments.datalist, arguments.output, split=arguments.split, device=arguments.device,
        label_field=arguments.label_field, labels_csv=arguments.labels_csv, seed=arguments.seed,
    )
    if metrics["task"] == "classification":
        low, high = metrics["auc_ci95"]
        print(f"{metrics['cases']} cases: AUC {metrics['auc']:.3f} (95 % CI {low:.3f}-{high:.3f}); report: {arguments.output}/report.md")
    else:
        for name, entry in metrics["summary"].items():
            print(f"{name}: Dice {entry['dice_mean']:.3f} ± {entry['dice_std']:.3f} over {len(metrics['cases'])} cases")
        print(f"report: {arguments.output}/report.md")
    return 0


def _embed(arguments: argparse.Namespace) -> int:
    from .embed import embed

    report = embed(
        arguments.datalist, arguments.output, model_dir=arguments.model, run_dir=arguments.run, pooling=arguments.pooling,
        crop_mode=arguments.crop, label_field=arguments.label_field, labels_csv=arguments.labels_csv, seed=arguments.seed,
        device=arguments.device,
    )
    print(f"features of {report['cases']} cases written to {arguments.output} (features.npz, cluster_distances.json, umap.png)")
    return 0


def _add_label_arguments(parser, seed_help: str, prefix: str = "") -> None:
    parser.add_argument("--label-field", default="class", help=f"{prefix}the datalist field holding each case's class (default: class)")
    parser.add_argument("--labels-csv", default=None, help=f"{prefix}CSV of 'case_id,label' rows, in place of the datalist field")
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {seed_help} (default: 0)")


def _export(arguments: argparse.Namespace) -> int:
    from .export import export_run

    folder = export_run(arguments.run, arguments.output, arguments.name)
    print(f"model bundle written to {folder}")
    return 0


def _datalist(arguments: argparse.Namespace) -> int:
    from dagman_core.data.datalist import build_datalist

    datalist = build_datalist(arguments.images, arguments.labels, arguments.output)
    print(f"{len(datalist['training'])} cases written to {arguments.output}")
    return 0


def _demo(arguments: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(arguments.output, pretrain_steps=arguments.pretrain_steps, finetune_steps=arguments.finetune_steps)
    print(json.dumps({"dice": result["evaluation"]["dice"], "output": str(arguments.output)}, indent=2))
    return 0


def _catalogue_entry(arguments: argparse.Namespace) -> int:
    import re

    from dagman_core.bundle import read_model_json, sha256_of

    description = read_model_json(arguments.bundle)
    sha256 = sha256_of(os.path.join(arguments.bundle, description["weights"]["file"]))
    if sha256 != description["weights"].get("sha256"):
        raise ValueError(
            f"the weights in {arguments.bundle} have sha256 {sha256}, but model.json records "
            f"{description['weights'].get('sha256')}; export the bundle again"
        )
    entry = {
        "id": arguments.id or re.sub(r"[^A-Za-z0-9]+", "-", description["name"]).strip("-").lower(),
        "title": arguments.title or description["name"],
        "task": description.get("task", "segmentation"),
        "labels": [
            {"value": label["value"], "name": label["name"], "terminology": label.get("terminology")}
            for label in description.get("labels", [])
        ],
        "licence": arguments.licence,
        "version": arguments.version or description.get("provenance", {}).get("dagman_version", ""),
        "sha256": sha256,
        "min_memory_gib": arguments.min_memory_gib,
        "url": arguments.url,
    }
    print(json.dumps(entry, indent=2))
    return 0


SET_HELP = "change one option after the presets; the value is read as YAML, e.g. --set masking.ratio=0.6 (repeatable)"


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``dagman`` with one subcommand per task."""
    from dagman_core.inference.cli import add_arguments as add_infer_arguments

    parser = argparse.ArgumentParser(prog="dagman", description="DAGMaN self-supervised pretraining and inference for 3D CT.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="print the resolved configuration of a preset, its sizes and parameter counts")
    config.add_argument("sources", nargs="*", metavar="PRESET_OR_YAML", help="presets or YAML files, merged left to right")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    config.add_argument("--json", action="store_true", help="print JSON with 'parameters' and 'mask_grid_tokens' added")
    config.add_argument("--list", action="store_true", help="list the shipped presets")
    config.set_defaults(handler=_config)

    pretrain = commands.add_parser("pretrain", help="pretrain a DAGMaN encoder (or a baseline) on unlabeled CT")
    pretrain.add_argument(
        "--config", nargs="+", default=[], metavar="PRESET_OR_YAML",
        help="preset names (dagman_swin, smit, tiny_cpu, ...; see 'dagman config --list') or YAML files, merged left to right",
    )
    pretrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    pretrain.add_argument("--datalist", required=True, help="datalist JSON whose 'training' list names the CT volumes")
    pretrain.add_argument("--output", required=True, help="run folder to write")
    pretrain.add_argument("--max-steps", type=int, default=None, help="stop after N steps (the schedules then span N steps)")
    pretrain.add_argument("--device", default="cpu", help="cpu, cuda or auto; under torchrun each process takes its own GPU (default: cpu)")
    pretrain.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --output")
    pretrain.set_defaults(handler=_pretrain)

    finetune = commands.add_parser("finetune", help="fine-tune a pretrained encoder on labeled CT")
    finetune.add_argument("--task", choices=("segmentation", "classification"), default="segmentation", help="downstream task (default: segmentation)")
    finetune.add_argument("--pretrained", required=True, help="pretraining run folder (contains encoder.safetensors)")
    finetune.add_argument("--datalist", required=True, help="datalist JSON: image and label paths (segmentation) or image and class (classification) under 'training'")
    finetune.add_argument("--output", required=True, help="run folder to write")
    finetune.add_argument(
        "--max-steps", type=int, default=None,
        help="number of steps (default: finetune.steps of the configuration; classification 300 linear, 200 full)",
    )
    finetune.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    finetune.add_argument(
        "--validate-every", type=int, default=None, metavar="N",
        help="segmentation: also score the datalist's 'validation' cases every N steps (they are always scored after the last step)",
    )
    classification = finetune.add_argument_group("classification")
    classification.add_argument("--mode", choices=("linear", "full"), default="linear", help="linear probing on the frozen encoder, or full fine-tuning (default: linear)")
    classification.add_argument("--pooling", choices=("cls", "stage4"), default="cls", help="feature: the SA [CLS] token or pooled stage-4 tokens (default: cls)")
    classification.add_argument("--folds", type=int, default=None, help="run stratified k-fold cross-validation first, e.g. --folds 3")
    classification.add_argument("--fraction", type=float, default=None, help="few-shot: train on this stratified share of the cases, e.g. 0.25")
    classification.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3 linear, 1e-4 full)")
    classification.add_argument("--batch-size", type=int, default=4, help="crops per step of full fine-tuning (default: 4)")
    classification.add_argument(
        "--crop", choices=("auto", "mask", "point", "whole"), default="auto",
        help="centre each crop on the case's 'mask', its 'point' (RAS mm) or the body; auto takes the first given (default: auto)",
    )
    _add_label_arguments(classification, "the folds, few-shot draws, bootstrap and training")
    finetune.set_defaults(handler=_finetune)

    evaluate = commands.add_parser("evaluate", help="evaluate a model bundle on labelled cases: metrics.json, report.md and plots")
    evaluate.add_argument("--model", required=True, help="model folder written by 'dagman export'")
    evaluate.add_argument("--datalist", required=True, help="datalist JSON with the labelled cases")
    evaluate.add_argument("--output", required=True, help="folder for metrics.json, report.md and the plots")
    evaluate.add_argument("--split", default=None, help="datalist list to read (default: validation when present, else training)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    _add_label_arguments(evaluate, "the bootstrap interval", prefix="classification: ")
    evaluate.set_defaults(handler=_evaluate)

    embed = commands.add_parser("embed", help="pooled encoder features per case, cluster distances per class and a UMAP plot")
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", default=None, help="model folder written by 'dagman export'")
    source.add_argument("--run", default=None, help="pretraining run folder (contains encoder.safetensors)")
    embed.add_argument("--datalist", required=True, help="datalist JSON with image and class per case")
    embed.add_argument("--output", required=True, help="folder for features.npz, embedding.csv, cluster_distances.json and umap.png")
    embed.add_argument("--pooling", choices=("cls", "stage4"), default="cls", help="feature: the SA [CLS] token or pooled stage-4 tokens (default: cls)")
    embed.add_argument("--crop", choices=("auto", "mask", "point", "whole"), default="auto", help="where each crop is centred (default: auto)")
    embed.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    _add_label_arguments(embed, "the UMAP projection")
    embed.set_defaults(handler=_embed)

    export = commands.add_parser("export", help="bundle a fine-tuning run as a model folder for inference and Slicer")
    export.add_argument("--run", required=True, help="fine-tuning run folder")
    export.add_argument("--output", required=True, help="model folder to write")
    export.add_argument("--name", default=None, help="model name shown to users (default: derived from the run)")
    export.set_defaults(handler=_export)

    entry = commands.add_parser(
        "catalogue-entry", help="print the models.json entry of a model bundle, with the sha256 of its weights"
    )
    entry.add_argument("bundle", help="model bundle folder")
    entry.add_argument("--url", required=True, help="where users download the bundle")
    entry.add_argument("--licence", required=True, help="licence of the weights, e.g. Apache-2.0 or CC-BY-4.0")
    entry.add_argument("--id", default=None, help="catalogue id (default: derived from the model name)")
    entry.add_argument("--title", default=None, help="title shown in Slicer (default: the model name)")
    entry.add_argument("--version", default=None, help="model version (default: the DAGMaN version it was exported with)")
    entry.add_argument("--min-memory-gib", type=float, default=None, help="memory a chest CT needs, measured by the publisher")
    entry.set_defaults(handler=_catalogue_entry)

    infer = commands.add_parser("infer", help="segment or classify a CT and map the model's attention")
    add_infer_arguments(infer)
    infer.set_defaults(handler=None)

    datalist = commands.add_parser("datalist", help="write a MONAI-style datalist JSON from a folder of volumes")
    datalist.add_argument("--images", required=True, help="folder of CT volumes (NIfTI, NRRD, MHA) or DICOM series folders")
    datalist.add_argument("--labels", default=None, help="folder of label maps, paired with the images by case id")
    datalist.add_argument("--output", required=True, help="datalist JSON file to write")
    datalist.set_defaults(handler=_datalist)

    from .diagnose import register as register_diagnose
    from .proxy_tasks import register as register_proxy_tasks

    register_diagnose(commands)
    register_proxy_tasks(commands)

    demo = commands.add_parser("demo", help="pretrain, fine-tune, export and run a tiny model on two public chest CTs")
    demo.add_argument("--output", required=True, help="folder for the demo's runs, model and results")
    demo.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default: the demo's)")
    demo.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps (default: the demo's)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dagman`` console script."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    # Under torchrun only rank 0 reports progress; the other ranks log warnings and errors.
    level = logging.DEBUG if arguments.verbose else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )

    if arguments.command == "infer":
        from dagman_core.inference.cli import run as run_infer

        return run_infer(arguments)

    try:
        return arguments.handler(arguments)
    except (OSError, ValueError, FloatingPointError) as error:
        logger.error("%s failed: %s", arguments.command, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
