"""The ``guardrail`` command: serve | check | eval | retrain | export-model."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from guardrail.errors import GuardrailError, ModelError
from guardrail.models import EXPORT_FILES
from guardrail.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 model not promoted, 2 error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except GuardrailError as exc:
        print(f"guardrail: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardrail", description="Keep a chatbot on topic.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the guarding reverse proxy in front of an LLM endpoint")
    serve.add_argument("--scenario", type=Path, help="the scenario document (Markdown)")
    serve.add_argument(
        "--upstream", help="the OpenAI-compatible endpoint to guard, e.g. http://127.0.0.1:8080"
    )
    serve.add_argument("--config", type=Path, help="a TOML file of settings (flags and GUARDRAIL_* win)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--mode", choices=["enforce", "shadow"], help="shadow never blocks (default enforce)")
    serve.add_argument("--refusal", help="the sentence blocked requests are answered with")
    serve.add_argument("--log-path", help="the interaction log (JSONL; default interactions.jsonl; '' = off)")
    serve.add_argument("--model", help="encoder: directory, installed model package or hub name")
    serve.add_argument("--cache-dir", type=Path, help="cache directory (default ~/.cache/guardrail)")
    serve.add_argument("--threshold", type=float, help="layer-1 threshold (default: calibrated)")
    serve.add_argument("--target-pass", type=float, help="on-topic pass rate to calibrate for (default 0.95)")
    serve.add_argument("--threads", type=int, help="encoder threads per worker (default 1)")
    serve.add_argument(
        "--prices",
        help="USD per million input and output tokens by model: a .toml or .json file, or inline JSON "
        '(e.g. \'{"gpt-4o-mini": {"input": 0.15, "output": 0.6}}\'); without it savings count tokens only',
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="server processes (default 1); their metrics add up in one scrape, each has its own log file",
    )
    serve.add_argument(
        "--classifier", type=Path, help="a layer-3 model from `guardrail retrain` (reloaded when it changes)"
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log every request on stderr too (off: the interaction log already records each one)",
    )
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="judge messages against a scenario document")
    _guard_options(check)
    check.add_argument(
        "texts", nargs="+", metavar="TEXT", help="messages to judge ('-' reads lines from stdin)"
    )
    check.add_argument("--json", action="store_true", help="print one JSON object per message")
    check.set_defaults(run=_check)

    evaluate = commands.add_parser("eval", help="evaluate the guard on labelled messages")
    _guard_options(evaluate)
    evaluate.add_argument(
        "--data", required=True, type=Path, help='JSONL rows {"text": str, "on_topic": bool}'
    )
    evaluate.add_argument("--json", action="store_true", help="print the report as one JSON object")
    evaluate.add_argument("--plot", type=Path, metavar="PNG", help="write a ROC curve to this PNG file")
    evaluate.add_argument(
        "--classifier", type=Path, metavar="ONNX", help="decide with this layer-3 classifier"
    )
    evaluate.set_defaults(run=_eval)

    retrain = commands.add_parser(
        "retrain", help="train a layer-3 classifier from interaction logs and labelled data"
    )
    retrain.add_argument(
        "--logs",
        required=True,
        nargs="+",
        type=Path,
        metavar="PATH",
        help='interaction logs (with their rotated backups) or JSONL rows {"text": str, "on_topic": bool}',
    )
    retrain.add_argument("--scenario", required=True, type=Path, help="the scenario document (Markdown)")
    retrain.add_argument(
        "--out", required=True, type=Path, help="the classifier to write, e.g. classifiers/NAME.onnx"
    )
    retrain.add_argument("--seed", type=int, default=0, help="seeds the split and the fit (default 0)")
    retrain.add_argument("--holdout", type=float, default=0.2, help="share held back (default 0.2)")
    retrain.add_argument(
        "--target-pass", type=float, help="on-topic pass rate to set the threshold for (default 0.95)"
    )
    retrain.add_argument("--force", action="store_true", help="promote the new model even if it is worse")
    retrain.add_argument("--quiet", action="store_true", help="no progress bars")
    retrain.add_argument("--model", help="encoder: directory, installed model package or hub name")
    retrain.add_argument("--cache-dir", type=Path, help="cache directory (default ~/.cache/guardrail)")
    retrain.add_argument("--threads", type=int, help="encoder threads (default: the cores, up to 4)")
    retrain.set_defaults(run=_retrain)

    report = commands.add_parser(
        "report", help="an HTML report of interaction logs: verdicts, savings, latency, blocked topics"
    )
    report.add_argument(
        "--logs", required=True, nargs="+", type=Path, metavar="PATH", help="interaction logs (with backups)"
    )
    report.add_argument("--out", required=True, type=Path, help="the HTML file to write")
    report.add_argument("--top", type=int, default=20, help="blocked topics to show (default 20)")
    report.add_argument(
        "--max-texts", type=int, default=5000, help="most recent refused messages to group (default 5000)"
    )
    report.add_argument("--model", help="encoder: directory, installed model package or hub name")
    report.add_argument("--cache-dir", type=Path, help="cache directory (default ~/.cache/guardrail)")
    report.add_argument("--threads", type=int, help="encoder threads (default: the cores, up to 4)")
    report.set_defaults(run=_report)

    export = commands.add_parser("export-model", help="export the encoder to ONNX into the cache")
    export.add_argument("--model", help="directory, installed model package or hub name")
    export.add_argument("--cache-dir", type=Path, help="cache directory (default ~/.cache/guardrail)")
    export.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="also copy the export here, for servers without torch (--model DIR)",
    )
    export.set_defaults(run=_export)
    return parser


def _guard_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", required=True, type=Path, help="the scenario document (Markdown)")
    parser.add_argument("--model", help="encoder: directory, installed model package or hub name")
    parser.add_argument("--cache-dir", type=Path, help="cache directory (default ~/.cache/guardrail)")
    parser.add_argument("--threshold", type=float, help="layer-1 threshold (default: calibrated)")
    parser.add_argument(
        "--target-pass", type=float, help="on-topic pass rate to calibrate for (default 0.95)"
    )
    parser.add_argument("--threads", type=int, help="encoder threads (default 1)")


def _load_guard(args: argparse.Namespace) -> Any:
    from guardrail.guard import Guard

    settings = Settings.load(
        model=args.model,
        cache_dir=args.cache_dir,
        threshold=args.threshold,
        target_pass=args.target_pass,
        threads=args.threads,
        classifier=getattr(args, "classifier", None),
    )
    return Guard.from_settings(settings, args.scenario)


NO_SCENARIO = "no scenario document: give --scenario, GUARDRAIL_SCENARIO or scenario = in --config"


def _serve(args: argparse.Namespace) -> int:
    import logging

    from guardrail.errors import ConfigError

    flags = {
        name: getattr(args, name)
        for name in (
            "scenario",
            "upstream",
            "host",
            "port",
            "mode",
            "refusal",
            "log_path",
            "model",
            "cache_dir",
            "threshold",
            "target_pass",
            "threads",
            "classifier",
            "workers",
            "prices",
        )
    }
    settings = Settings.load(config=args.config, **flags)
    if settings.scenario is None:
        raise ConfigError(NO_SCENARIO)
    if settings.upstream is None:
        raise ConfigError("no upstream: give --upstream, GUARDRAIL_UPSTREAM or upstream = in --config")
    if settings.workers > 1:
        # Before the app's imports below: the parent loads no model, and needs neither onnxruntime nor
        # the app (the workers import them afresh, spawned).
        from guardrail.workers import ServeOptions, serve_workers

        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
        return serve_workers(settings, ServeOptions(log_level=args.log_level, access_log=args.access_log))

    import uvicorn

    from guardrail.guard import Guard
    from guardrail.proxy import create_app

    guard = Guard.from_settings(settings)
    app = create_app(settings, guard)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"guardrail: guarding {settings.upstream} with {settings.scenario} "
        f"({guard.document.title}; threshold {guard.threshold:+.4f}, mode {settings.mode})\n"
        f"guardrail: clients use base URL {base}/v1; metrics at {base}/metrics; "
        f"log {settings.log_path or 'off'}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
    return 0


def _check(args: argparse.Namespace) -> int:
    texts = (
        [line for line in sys.stdin.read().splitlines() if line.strip()]
        if args.texts == ["-"]
        else args.texts
    )
    guard = _load_guard(args)
    for text, verdict in zip(texts, guard.check_many(texts), strict=True):
        word = "on-topic" if verdict.allowed else "off-topic"
        if args.json:
            row = {
                "text": text,
                "verdict": word,
                "allowed": verdict.allowed,
                "score": round(verdict.score, 4),
                "threshold": round(verdict.threshold, 4),
                "layer": verdict.layer,
                "scenario": verdict.scenario,
            }
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        else:
            print(f"{word:9s}  score {verdict.score:+.3f}  threshold {verdict.threshold:+.3f}  {text}")
            print(f"           nearest scenario: {verdict.scenario}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from guardrail.evaluation import load_labelled, plot_roc, report

    data = load_labelled(args.data)
    guard = _load_guard(args)
    classifier = guard.classifier
    # With a classifier the scores are its probabilities, and its threshold decides.
    threshold = guard.threshold if classifier is None else classifier.threshold
    scores = np.array([v.score for v in guard.check_many(data.texts)], dtype=np.float64)
    result = report(scores, data.on_topic, threshold)
    if args.plot:
        plot_roc(scores, data.on_topic, threshold, args.plot, title=guard.document.title)
    if args.json:
        row = result.as_dict()
        if classifier is not None:
            row["classifier"] = {
                "path": str(classifier.path),
                "name": classifier.name,
                "threshold": classifier.threshold,
                "created": classifier.card.get("created"),
            }
        sys.stdout.write(orjson.dumps(row).decode() + "\n")
        return 0
    print(f"scenario   {args.scenario} ({guard.document.title})")
    if classifier is not None:
        print(f"classifier {classifier.path} (layer 3 decides; its threshold is from its card)")
    print(f"data       {args.data}: {result.n_on} on-topic, {result.n_off} off-topic")
    print(f"AUROC      {result.auroc:.4f}")
    print(f"at 95% on-topic pass: {result.block_rate_at_pass_95:.1%} of off-topic blocked")
    print(f"at 5% off-topic leak: {result.pass_rate_at_leak_5:.1%} of on-topic passed")
    source = guard.similarity.calibration.source
    origin = "as set" if source == "setting" else f"calibrated from the {source}"
    if classifier is not None:
        origin = "the classifier's"
    print(
        f"threshold  {result.threshold:+.4f} ({origin}): "
        f"{result.pass_rate:.1%} on-topic passed, {result.block_rate:.1%} off-topic blocked"
    )
    if args.plot:
        print(f"ROC curve written to {args.plot}")
    return 0


def _batch_threads(args: argparse.Namespace) -> int:
    """Encoder threads for a batch job (retrain, report): unlike the server, it gains from every core."""
    return int(args.threads) if args.threads is not None else min(4, os.cpu_count() or 1)


def _report(args: argparse.Namespace) -> int:
    from guardrail.report import run

    settings = Settings.load(model=args.model, cache_dir=args.cache_dir)
    threads = _batch_threads(args)
    summary = run(
        args.logs,
        args.out,
        model=settings.model,
        cache_dir=settings.cache_path,
        top=args.top,
        max_texts=args.max_texts,
        threads=threads,
    )
    print(
        f"wrote {summary.out}: {summary.requests} requests, {summary.verdicts.get('blocked', 0)} blocked, "
        f"{summary.topics} blocked topics of two messages or more"
    )
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from guardrail.guard import Guard
    from guardrail.training import retrain

    threads = _batch_threads(args)
    settings = Settings.load(
        model=args.model, cache_dir=args.cache_dir, target_pass=args.target_pass, threads=threads
    )
    guard = Guard.load(
        args.scenario,
        model=settings.model,
        cache_dir=settings.cache_path,
        threads=settings.threads,
        target_pass=settings.target_pass,
        threshold=settings.threshold,
    )
    result = retrain(
        guard,
        args.logs,
        args.out,
        seed=args.seed,
        holdout=args.holdout,
        target_pass=settings.target_pass,
        force=args.force,
        refusal=settings.refusal,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    data = result.data
    on = sum(label.on_topic for label in data.labels)
    skipped = ", ".join(f"{n} {reason}" for reason, n in data.skipped.items()) or "none"
    sources = ", ".join(f"{source} {n}" for source, n in data.sources().items())
    print(
        f"examples   {len(data.labels)}: {on} on-topic, {len(data.labels) - on} off-topic "
        f"(labels: {sources}); {data.duplicates} duplicates merged, {data.conflicts} in conflict"
    )
    print(f"skipped    {skipped}")
    if result.previous_note:
        print(f"note       {result.previous_note}")
    print(f"held back  compared on {result.evaluated_on}, at {settings.target_pass:.0%} on-topic passed:")
    for metrics in (result.new, result.previous):
        print(f"  {metrics.name:12s} AUROC {metrics.auroc:.4f}, blocks {metrics.block_rate:.1%} of off-topic")
    print(
        f"threshold  {result.threshold:.4f} (out-of-fold): passes {result.pass_rate:.1%} "
        "of held-back on-topic"
    )
    if result.reason is not None and not result.promoted:
        print(f"guardrail: not promoted: {result.reason}", file=sys.stderr)
        return 1
    if result.reason is not None:
        print(f"forced     {result.reason.split(';')[0]}")
    print(f"wrote      {args.out} and its card {args.out.with_suffix('.json')}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from guardrail.encoder import Encoder

    settings = Settings.load(model=args.model, cache_dir=args.cache_dir)
    encoder = Encoder.load(settings.model, cache_dir=settings.cache_path)
    cosine = encoder.meta.get("verified_min_cosine")
    print(f"{encoder.id}: exported to {encoder.path} (min cosine to sentence-transformers: {cosine})")
    if args.out is not None and encoder.path is not None:
        copy_export(encoder.path, args.out)
        print(f"copied to {args.out}: serve it with --model {args.out} (no torch needed)")
    return 0


def copy_export(source: Path, out: Path) -> None:
    """Copy an exported model's files into ``out``, each replaced in one rename."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in EXPORT_FILES:
            tmp = out / f".{name}.tmp"
            shutil.copyfile(source / name, tmp)
            os.replace(tmp, out / name)
    except OSError as exc:
        raise ModelError(f"cannot copy the export to {out}: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
