"""The ``fedrad`` command: simulate a study, evaluate a model, read a privacy ledger."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

# Our runs never phone home or install packages at run time (set before flwr is imported).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

from common.config import MODELS, MODES, STRATEGIES, ConfigError, StudyConfig  # noqa: E402
from common.data import native_size  # noqa: E402
from common.dicom import MULTIFRAME_POLICIES  # noqa: E402
from common.errors import DataError, FedradError  # noqa: E402
from common.progress import report_progress  # noqa: E402
from fedrad.simulation import BACKENDS  # noqa: E402

# simulate options that are not study settings: they may come with --resume (--tensorboard: where this
# run also writes its scalars).
_RUN_OPTIONS = frozenset({"resume", "backend", "verbose", "tensorboard"})
# simulate options whose study setting has another name (the others set the setting of their own name).
_SETTING_OF_OPTION = {"rounds": "num_rounds", "sites": "num_sites", "no_dp": "dp"}


def _resumed_study(args: argparse.Namespace) -> StudyConfig:
    """The study saved in --resume RUN_DIR, if it can continue there: checked as the server will check it
    (RunDirectory.resume_point: not finished, nothing from another study), and every simulate option
    given with --resume that sets a study setting must agree with the saved study (one that differs is an
    error naming it: the saved study is what resumes). Refused before anything is written or started (the
    checkpoint is read, so torch is imported before Ray starts: a resume starts ~2 s later)."""
    from fedrad import simulation
    from server.rundir import RunDirectory

    run_dir = RunDirectory(args.resume)
    saved = run_dir.saved_study()
    given = _given_options(args)
    tensorboard = {"tensorboard": str(Path(given["tensorboard"]).resolve())} if given.get("tensorboard") else {}
    study = saved.replace(resume=True, out=str(run_dir.path), **tensorboard)
    run_dir.resume_point(study)
    sites = simulation.site_count(saved, saved.num_sites or 3)  # the server checks it too, once the data is read
    if saved.num_sites and sites != saved.num_sites:
        raise FedradError(f"cannot resume: {saved.data} now holds {sites} sites, the study saved in {run_dir.path} "
                          f"has {saved.num_sites}; use --out for a new study")
    conflicts = [_conflict(dest, value, saved, run_dir.path) for dest, value in given.items()
                 if dest not in _RUN_OPTIONS]
    conflicts = [c for c in conflicts if c]
    if conflicts:
        raise FedradError(f"cannot resume with {', '.join(conflicts)}: options given with --resume must agree "
                          f"with the study saved in {run_dir.path}; resume without them, or use --out for a new study")
    return study


def _given_options(args: argparse.Namespace) -> dict[str, object]:
    """The simulate options on the command line (dest -> value), without the defaults of those not given:
    its arguments parsed again with every default suppressed."""
    parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["simulate"]
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    if "simulate" not in argv:  # not called through main(): nothing to tell
        return {}
    given = vars(parser.parse_args(argv[argv.index("simulate") + 1:]))
    return {a.dest: given[a.dest] for a in parser._actions if a.dest in given}


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _setting(dest: str, value: object, saved: StudyConfig) -> object:
    """What simulate's option ``dest`` given as ``value`` makes of its study setting (before StudyConfig
    resolves a 0 for --lr and --local-epochs)."""
    if dest == "no_dp":
        return not value
    if dest in ("data", "out"):
        return str(Path(str(value)).resolve())
    if dest == "image_size" and value == 0:
        return native_size(saved.data) or StudyConfig().image_size
    return value


def _conflict(dest: str, value: object, saved: StudyConfig, run_dir: Path) -> str:
    """'--OPTION VALUE (saved: KEY=VALUE)' where the option sets a study setting otherwise than ``saved``;
    '' where it agrees (0, for --lr, --local-epochs and --image-size, is the default the study resolved)."""
    option = f"--{dest.replace('_', '-')}"
    if dest == "out":
        return "" if _setting(dest, value, saved) == str(run_dir) else f"{option} {value} (saved: out={run_dir})"
    name = _SETTING_OF_OPTION.get(dest, dest)
    wanted = _setting(dest, value, saved)
    try:
        resolved = getattr(saved.replace(**{name: wanted}), name)
    except ConfigError:  # a value the saved study cannot take: another study
        resolved = wanted
    if resolved == getattr(saved, name):
        return ""
    key = name.replace("_", "-")
    typed = (option if value else f"--no-{option[2:]}") if isinstance(value, bool) else f"{option} {_shown(value)}"
    return f"{typed} (saved: {key}={_shown(getattr(saved, name))})"


def _simulate(args: argparse.Namespace) -> int:
    # Nothing that imports torch before Ray starts (fedrad/simulation.py start_ray): it imports
    # in the data-check thread while Ray's processes start.
    from fedrad import simulation

    if args.resume:
        study = _resumed_study(args)
    else:
        out = Path(args.out or f"runs/sim-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        if (out / "config.json").exists():
            # Its ledgers and metrics belong to that study: never overwrite them.
            raise FedradError(f"{out} already holds a study; use --resume {out} or another --out")
        data = args.data or str(out / "demo-data")
        study = StudyConfig(  # every value is checked here, before anything is written
            num_rounds=args.rounds,
            local_epochs=args.local_epochs,
            strategy=args.strategy,
            model=args.model,
            image_size=args.image_size or native_size(data) or StudyConfig().image_size,
            batch_size=args.batch_size,
            multiframe=args.multiframe,
            augment=args.augment,
            augment_overrides=args.augment_overrides,
            augment_multiplicity=args.augment_multiplicity,
            lr=args.lr,
            dp=not args.no_dp,
            epsilon=args.epsilon,
            delta=args.delta,
            max_grad_norm=args.max_grad_norm,
            secure_aggregation=args.secure_aggregation,
            seed=args.seed,
            out=str(out),
            data=str(Path(data).resolve()),
            partition=args.partition,
            mode=args.mode,
            tensorboard=str(Path(args.tensorboard).resolve()) if args.tensorboard else "",
            fraction_train=args.fraction_train,
            round_timeout=args.round_timeout,
            **({"class_names": args.class_names} if args.class_names else {}),
            **({"channels": args.channels} if args.channels else {}),
            ordinal=args.ordinal,
            **({"min_nodes": args.min_nodes} if args.min_nodes else {}),
        )
        if not args.data and not Path(data).exists():
            from common.phantoms import write_demo_sites

            _with_sites(study, args.sites or 3, bool(args.min_nodes))  # refused before the demo data is written
            write_demo_sites(Path(data), num_sites=args.sites or 3, seed=args.seed)
            print(f"wrote built-in demo data (synthetic DICOM chest phantoms) to {data}", flush=True)
        study = simulation.task_of(study, bool(args.class_names), bool(args.channels))  # the rest from the data
    num_sites = simulation.site_count(study, args.sites or study.num_sites or 3)
    study = _with_sites(study, num_sites, bool(args.min_nodes))
    if study.mode == "federated" and study.secure_aggregation and num_sites < 2:
        raise ConfigError("secure aggregation needs at least 2 sites (server/secagg.py)", "secure-aggregation")

    def check() -> None:  # a bad preset or bad data fails here, not in every hospital
        from client.augmentation import resolve as resolve_augment

        resolve_augment(study.augment, study.augment_overrides)
        simulation.check_sites(study, num_sites)

    backend = simulation.choose_backend(args.backend, num_sites, os.cpu_count() or 1)
    if study.mode == "federated" and backend == "ray":  # Ray starts while the data is checked (README
        simulation.start_ray(num_sites, args.verbose, check)  # "Federation overhead")
    else:
        check()
    dp = f"DP epsilon {study.epsilon} delta {study.delta}" if study.dp else "no DP"
    how = f"federated, {backend} backend" if study.mode == "federated" else study.mode
    how += ", secure aggregation" if study.mode == "federated" and study.secure_aggregation else ""
    print(f"simulating {num_sites} sites ({how}), {study.num_rounds} rounds, {study.strategy}, {study.model} "
          f"{study.image_size}px, {dp}", flush=True)
    t0 = time.time()
    if study.mode == "federated":
        run_dir = simulation.run(study, num_sites, verbose=args.verbose, backend=backend)
        if not run_dir.model_path.exists():
            raise FedradError(f"the study did not finish; see the log above (run dir {run_dir.path})")
        from fedrad.baselines import write_cross_site

        last = run_dir.rounds()[-1]
        write_cross_site(run_dir, "federated", {"global": {s["site"]: s for s in last["sites"] if s["n_val"]}})
    else:
        from fedrad.baselines import run_baseline

        run_dir = run_baseline(study, num_sites, study.mode)
    print(f"done in {time.time() - t0:.0f} s: {run_dir.path}", flush=True)
    return 0


def _with_sites(study: StudyConfig, num_sites: int, min_nodes_given: bool) -> StudyConfig:
    """The study with its number of sites. Without --min-nodes a round needs the default, or every site where
    there are fewer; a --min-nodes above the number of sites is refused (a ConfigError), never lowered."""
    min_nodes = study.min_nodes if min_nodes_given else min(study.min_nodes, num_sites)
    return study.replace(num_sites=num_sites, min_nodes=min_nodes)


def _evaluate(args: argparse.Namespace) -> int:
    from fedrad.evaluation import evaluate_model

    result = evaluate_model(Path(args.model), Path(args.data), args.threshold)
    for key, value in result.items():
        if key.endswith("_ci95"):
            continue
        ci = result.get(f"{key}_ci95")
        if isinstance(value, dict):  # per class: recall, one-vs-rest AUC; the local operating point
            print(f"{key:>18}:")
            for name, number in value.items():
                shown = "—" if number is None else f"{number:.8g}" if name == "threshold" else f"{number:.4f}"
                print(f"{name:>22}: {shown}")
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:>18}: {shown}" + (f"  (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ""))
    local = result.get("local_operating_point")
    if local:
        held_out = local["held_out_balanced_accuracy"]
        print(f"these images favour the threshold {local['threshold']:.8g} (balanced accuracy "
              f"{local['balanced_accuracy']:.3f} here, optimistic; "
              + (f"{held_out:.3f} when chosen on half of them and scored on the other half" if held_out is not None
                 else "too few images of a class to check it on images it was not chosen on")
              + f"); to decide with it: fedrad predict --threshold {local['threshold']:.8g}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _privacy(args: argparse.Namespace) -> int:
    from client.privacy import LEDGER_FILE, PrivacyLedger

    root = Path(args.state_dir)
    if not root.exists():
        raise FedradError(f"state dir not found: {root}")
    ledgers = [root] if (root / LEDGER_FILE).exists() else sorted(p.parent for p in root.glob(f"**/{LEDGER_FILE}"))
    if not ledgers:
        raise FedradError(f"no privacy ledger ({LEDGER_FILE}) under {root}")
    print(f"{'state dir':<40} {'dataset':<18} {'site':<14} {'epsilon':>8} {'delta':>8} {'rounds':>6}  last study")
    for state in ledgers:
        for fingerprint, entry in PrivacyLedger(state).datasets().items():
            last = entry.rounds[-1] if entry.rounds else {}
            eps = entry.epsilon()
            print(f"{str(state):<40} {fingerprint:<18} {entry.name:<14} {eps:>8.3f} {entry.delta:>8.0e} "
                  f"{len(entry.rounds):>6}  {last.get('study', '-')} round {last.get('round', '-')}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from fedrad.datacheck import check_folder, format_report

    classes = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    report = check_folder(Path(args.dir), Path(args.labels) if args.labels else None, classes)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if not report.usable:
        raise FedradError(f"{args.dir} is not usable: {report.verdict}")
    return 0


def _data_channels(args: argparse.Namespace) -> int:
    """--channels, else what the folder holds as simulate takes it (common/data.py ``source_channels``: 3 where
    its images hold colour, else 1), said aloud."""
    if args.channels:
        return args.channels
    from common.data import source_channels

    if not Path(args.dir).is_dir():
        raise FedradError(f"not a folder: {args.dir}")
    channels = source_channels(Path(args.dir), os.cpu_count() or 1)
    print(f"from the data: {channels} channel{'s' if channels > 1 else ''} ({'colour' if channels == 3 else 'grey'})",
          flush=True)
    return channels


def _data_preview(args: argparse.Namespace) -> int:
    from fedrad.preview import contact_sheet

    channels = _data_channels(args)
    shown = contact_sheet(Path(args.dir), Path(args.out), args.image_size, channels, args.max,
                          Path(args.labels) if args.labels else None)
    print(f"wrote {args.out}: {shown} images as the model sees them ({args.image_size} px)")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from common.cache import FolderCache
    from common.data import LabelTable

    root = Path(args.dir)
    if not root.is_dir():
        raise FedradError(f"not a folder: {root}")
    table, _ = LabelTable.read(root, required=False)
    paths = table.files(root.resolve())
    if not paths:
        raise DataError(f"{root}: no files to prepare")
    channels = _data_channels(args)
    report_progress(after=0)  # preparing is the long work itself: its progress from the first file
    cache = FolderCache(root, args.image_size, channels)
    start = time.time()
    items, decoded = cache.update(paths, workers=args.workers or os.cpu_count() or 1)
    usable = sum(1 for item in items if item.pixels is not None)
    print(f"{len(items)} files: {decoded} decoded, {len(items) - decoded} unchanged from the cache; "
          f"{usable} usable images at {args.image_size} px in {time.time() - start:.1f} s -> {cache.dir}")
    if not usable:
        raise DataError(f"{root}: none of its {len(items)} files is a usable image (see 'fedrad data check {root}')")
    return 0


def _augment_preview(args: argparse.Namespace) -> int:
    from fedrad.augment_preview import augment_sheet

    classes = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    tiles = augment_sheet(Path(args.data), Path(args.out), args.preset, args.overrides, args.images, args.views,
                          args.image_size, classes, args.seed)
    print(f"wrote {args.out}: {tiles} tiles ({args.preset}; originals in the first column)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fedrad.predict import predict

    report = predict(Path(args.model), [Path(p) for p in args.paths], Path(args.heatmap) if args.heatmap else None,
                     threshold=args.threshold)
    print(f"decision: {report['decision']}")
    modality_checked = any(c.startswith("modality") for c in report["input_check"]["checked"])
    for row in report["predictions"]:
        probs = " ".join(f"{c}={p:.3f}" for c, p in row["probabilities"].items())
        print(f"{row['file']}: {row['prediction']} ({probs})")
        for warning in row["warnings"]:
            print(f"  warning: {warning}")
        if modality_checked and row["modality_check"].startswith("not checked"):
            print(f"  modality {row['modality_check']}")  # a PNG or JPEG: no modality to check
    for row in report["skipped"]:
        print(f"{row['file']}: skipped, {row['reason']}")
    print(f"{len(report['predictions'])} predicted ({report['warned']} with a warning), "
          f"{len(report['skipped'])} skipped")
    for line in report["input_check"]["not_checked"]:
        print(f"not checked: {line}")
    if not report["predictions"]:
        found = len(report["skipped"])
        raise DataError(f"none of the {found} files could be read (reasons above)" if found else
                        f"no DICOM, PNG or JPEG files in {', '.join(args.paths)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedrad.report import write_report

    out = Path(args.out or Path(args.run_dirs[0]) / "report.html")
    write_report([Path(p) for p in args.run_dirs], out)
    print(f"wrote {out}")
    return 0


def _certs_init(args: argparse.Namespace) -> int:
    from fedrad.certs import init_study

    for path in init_study(Path(args.out), args.server_name.split(",")):
        print(f"wrote {path}")
    print("give ca.crt to every hospital; server.key stays on the server")
    return 0


def _certs_node(args: argparse.Namespace) -> int:
    from fedrad.certs import node_keys

    key, pub = node_keys(Path(args.out), args.site)
    print(f"wrote {key} (stays at the hospital) and {pub} (send it to the coordinator to register)")
    return 0


def _server_start(args: argparse.Namespace) -> int:
    from fedrad.deploy import QUIET, superlink_command
    from fedrad.front_door import LOOPBACK, check_loopback_names, door_command, private_files, serve
    from fedrad.preflight import server_summary

    if not args.insecure and not args.certs:
        raise FedradError("--certs DIR (from 'fedrad certs init') is required, or --insecure for a test network")
    if args.port == args.control_port and not args.no_front_door:
        raise FedradError(f"--port and --control-port are both {args.port}: the door and the SuperLink need two")
    certs = None if args.insecure else Path(args.certs)
    state = Path(args.state)
    if certs is not None:
        check_loopback_names(certs / "server.crt")
    summary = server_summary(certs, state)  # the server certificate checked: fedrad/preflight.py
    processes = {"the SuperLink": superlink_command(certs, state, LOOPBACK, args.control_port)}
    if not args.no_front_door:
        processes["the front door (nginx)"] = door_command(state, certs, args.host, args.port, args.control_port)
    private_files(state)
    scheme = "http" if args.insecure else "https"
    if args.insecure:
        print("fedrad: WARNING: --insecure: plain text, no TLS and no hospital authentication; "
              "use only on a private test network", file=sys.stderr)
    if args.no_front_door:
        print(f"fedrad: hospitals' door: none (--no-front-door): only SuperNodes on this machine can connect, "
              f"to {LOOPBACK}:{args.control_port}")
    else:
        print(f"fedrad: hospitals' door: {scheme}://{args.host}:{args.port} (nginx: Flower's Fleet API and "
              f"/health only; anything else 403; config {state / 'front-door' / 'nginx.conf'})")
    print(f"fedrad: SuperLink: {scheme}://{LOOPBACK}:{args.control_port} (this machine only: Control for "
          "'fedrad server run' and 'flwr', the ServerApp's Runtime; from elsewhere through an SSH tunnel)")
    print(summary, flush=True)
    env = {**os.environ, **QUIET}
    # Flower starts helpers (flower-superexec) by name: this environment's own first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return serve(processes, env)


def _server_run(args: argparse.Namespace) -> int:
    import tempfile

    from fedrad.deploy import QUIET, read_study, resume_study, study_command

    if not args.insecure and not args.certs:
        raise FedradError("--certs DIR (with the study's ca.crt) is required, or --insecure for a test network")
    if args.resume:
        if args.config or args.out:
            raise FedradError("--resume RUN_DIR continues the study saved there: give no --config or --out")
        flat = resume_study(Path(args.resume))
    elif args.config:
        flat = read_study(Path(args.config), args.out)
    else:
        raise FedradError("--config study.toml (a new study) or --resume RUN_DIR (a stopped one) is required")
    with tempfile.TemporaryDirectory(prefix="fedrad-flwr-") as home:
        cmd = study_command(args.server, None if args.insecure else Path(args.certs), flat, Path(home))
        env = {**os.environ, **QUIET, "FLWR_HOME": home}
        return subprocess.run(cmd, env=env).returncode


def _client_start(args: argparse.Namespace) -> int:
    from client.approval import approved_code, describe
    from client.policy import node_policy
    from client.runtime import serve
    from fedrad.deploy import start, supernode_command
    from fedrad.preflight import check_node

    if not args.insecure and not args.ca:
        raise FedradError("--ca ca.crt and --key SITE.key are required, or --insecure for a test network")
    policy = node_policy(args.policy, Path(args.state), args.max_epsilon)  # a bad policy file stops here
    approved = approved_code(policy.approved_code, policy.source)  # fixed for this node's life
    # This machine, then the server (waits while it cannot be reached): fedrad/preflight.py. Nothing written.
    started = check_node(args.server, None if args.insecure else Path(args.ca), Path(args.key) if args.key else None,
                         args.site, Path(args.data), Path(args.state), args.port, policy,
                         lambda line: print(line, file=sys.stderr, flush=True))
    cmd = supernode_command(args.server, None if args.insecure else Path(args.ca),
                            Path(args.key) if args.key else None, args.site, Path(args.data), Path(args.state),
                            args.max_epsilon, args.port, Path(args.policy) if args.policy else None)
    print(started, file=sys.stderr)
    print("\n".join(policy.describe() + describe(approved)), file=sys.stderr, flush=True)
    return serve(start(cmd, args.insecure), f"127.0.0.1:{args.port}", approved, Path(args.state))


def _policy_show(args: argparse.Namespace) -> int:
    from client.approval import approved_code, describe
    from client.policy import node_policy

    policy = node_policy(args.policy, Path(args.state), args.max_epsilon)
    print("\n".join(policy.describe() + describe(approved_code(policy.approved_code, policy.source))))
    return 0


def _client_digest(args: argparse.Namespace) -> int:
    from client.approval import digest_of, installed_checkout

    path = Path(args.path) if args.path else installed_checkout()
    if path is None:
        raise FedradError("this fedrad is not installed from a checkout: give the checkout or .fab to digest")
    print(f"{digest_of(path)}  {path}")
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help ends each option's help with its default, where it has one to show (not None, False or '')."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: --help with defaults (_Help), and errors on one line,
    'fedrad simulate: error: ... (see fedrad simulate --help)', exit status 2."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _probability(text: str) -> float:
    """A --threshold value: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (got {text!r})")
    return value


def _at_least_one(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _study_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Config key -> the option of ``parser`` that sets it ('num-rounds' -> '--rounds'), for ConfigError.naming."""
    return {_SETTING_OF_OPTION.get(a.dest, a.dest).replace("_", "-"): a.option_strings[-1]
            for a in parser._actions if a.option_strings}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedrad", description="Federated DP training of medical image CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = StudyConfig()

    sim = sub.add_parser("simulate", help="run a federation of virtual hospitals on this machine")
    sim.add_argument("--data", help="npz, folder with labels.csv or class subfolders, or a folder of site "
                     "folders (natural partition); default: built-in synthetic DICOM phantoms")
    sim.add_argument("--mode", default="federated", choices=MODES,
                     help="federated; local: each site alone; pooled: all data in one place")
    sim.add_argument("--sites", type=_at_least_one,
                     help="number of sites (default: 3; a folder of site folders has one per folder)")
    sim.add_argument("--partition", default="iid", help="how one source is split into sites: iid or dirichlet:ALPHA")
    sim.add_argument("--rounds", type=int, default=d.num_rounds, help="training rounds")
    sim.add_argument("--local-epochs", type=int, default=0,
                     help="local epochs per round; 0 means 3, or 1 under DP with epsilon below 3")
    sim.add_argument("--strategy", default=d.strategy, choices=STRATEGIES,
                     help="how the server combines the sites' updates")
    sim.add_argument("--model", default=d.model, choices=MODELS,
                     help="scatternet: fixed wavelet scattering + a small CNN; cnn; resnet18 (GroupNorm)")
    sim.add_argument("--image-size", type=int, default=0,
                     help=f"model input side in pixels; 0 means a .npz's own size, else {d.image_size} "
                     "(upsampling 28 px arrays costs 5x and measured worse under DP)")
    sim.add_argument("--augment", default=d.augment,
                     help="augmentation preset: none, chest-xray, mammography, mri, ultrasound")
    sim.add_argument("--augment-overrides", default="", help="e.g. 'rotation_deg=10 elastic_p=0'")
    sim.add_argument("--augment-multiplicity", type=int, default=d.augment_multiplicity,
                     help="K augmented views per image, gradients averaged before clipping (no privacy cost)")
    sim.add_argument("--multiframe", default=d.multiframe, choices=MULTIFRAME_POLICIES,
                     help="how a multi-frame DICOM becomes one image: its middle or first frame, or the max "
                     "projection")
    sim.add_argument("--batch-size", type=int, default=d.batch_size, help="images per training step")
    sim.add_argument("--lr", type=float, default=0.0,
                     help="SGD step size; 0 means 0.5 under DP, 0.05 with --no-dp (measured)")
    sim.add_argument("--epsilon", type=float, default=d.epsilon, help="target epsilon per site for the study")
    sim.add_argument("--delta", type=float, default=d.delta, help="DP delta per site")
    sim.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                     help="DP clipping bound of each example's gradient")
    sim.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    sim.add_argument("--secure-aggregation", action=argparse.BooleanOptionalAction, default=False,
                     help="mask each site's update with Flower's SecAgg+ so the server learns only their weighted "
                     "mean (a deployed study's default; needs at least 2 sites a round)")
    sim.add_argument("--min-nodes", type=_at_least_one,
                     help=f"sites a round needs (default: {d.min_nodes}, or every site where there are fewer)")
    sim.add_argument("--fraction-train", type=float, default=d.fraction_train,
                     help="share of sites sampled to train each round")
    sim.add_argument("--round-timeout", type=float, default=d.round_timeout,
                     help="seconds each phase of a round (train, evaluate) waits for replies before closing with "
                     "those it has")
    sim.add_argument("--class-names", help="comma-separated class names (default: the data's own: an .npz's class "
                     "indices or label_names, labels.csv's labels or label_name column, class folders; docs/data.md)")
    sim.add_argument("--channels", type=int, choices=[1, 3],
                     help="1 (grey) or 3 (RGB) model input (default: 3 where the data holds colour, else 1)")
    sim.add_argument("--ordinal", action="store_true",
                     help="the classes are ordered grades: sites also report quadratic weighted kappa")
    sim.add_argument("--out", help="run directory (default: runs/sim-TIMESTAMP)")
    sim.add_argument("--tensorboard", metavar="DIR", default="", help="also write TensorBoard scalars to DIR")
    sim.add_argument("--seed", type=int, default=d.seed, help="seed of the partition, the splits and training")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped study from its last checkpoint")
    sim.add_argument("--backend", default="auto", choices=BACKENDS,
                     help="where the virtual hospitals run: ray (Ray actors, in parallel where there is a core per "
                     "site), inline (this process, one after another); auto: ray only where it runs "
                     "sites in parallel")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own log lines")
    sim.set_defaults(func=_simulate, options=_study_options(sim))

    ev = sub.add_parser("evaluate", help="evaluate a model.pt on a labelled data set")
    ev.add_argument("--model", required=True, help="a fedrad model.pt")
    ev.add_argument("--data", required=True, help="labelled images: npz or a folder, as simulate reads them")
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    ev.add_argument("--threshold", type=_probability, help="decide the positive class at this probability "
                    "(default: the operating point stored in model.pt, else the argmax)")
    ev.set_defaults(func=_evaluate)

    data = sub.add_parser("data", help="check or preview a hospital's images before joining a study")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    chk = data_sub.add_parser("check", help="what was found, what will be used, what was skipped and why")
    chk.add_argument("dir", help="the hospital's image folder (DICOM, PNG or JPEG; labels.csv or class folders)")
    chk.add_argument("--labels", help="labels CSV (default DIR/labels.csv)")
    chk.add_argument("--class-names", help="comma-separated class names the study uses (labels are checked)")
    chk.add_argument("--json", help="also write the full report to this JSON file")
    chk.set_defaults(func=_data_check)
    pre = data_sub.add_parser("preview", help="a labelled contact sheet of images as the model sees them")
    pre.add_argument("dir", help="the image folder to preview")
    pre.add_argument("--out", required=True, help="PNG file to write")
    pre.add_argument("--labels", help="labels CSV (default DIR/labels.csv)")
    pre.add_argument("--image-size", type=int, default=d.image_size, help="model input side in pixels")
    pre.add_argument("--channels", type=int, choices=[1, 3],
                     help="1 (grey) or 3 (RGB) model input (default: 3 where the data holds colour, else 1)")
    pre.add_argument("--max", type=_at_least_one, default=48, help="at most this many images")
    pre.set_defaults(func=_data_preview)

    prep = data_sub.add_parser("prepare", help="decode once into the local cache training reads from")
    prep.add_argument("dir", help="the image folder to decode into the cache")
    prep.add_argument("--image-size", type=int, default=d.image_size, help="model input side in pixels")
    prep.add_argument("--channels", type=int, choices=[1, 3],
                      help="1 (grey) or 3 (RGB) model input (default: 3 where the data holds colour, else 1)")
    prep.add_argument("--workers", type=int, default=0, help="decoding processes; 0 means all cores")
    prep.set_defaults(func=_data_prepare)

    aug = sub.add_parser("augment", help="see what training-time augmentation does")
    aug_sub = aug.add_subparsers(dest="augment_command", required=True)
    apv = aug_sub.add_parser("preview", help="originals next to augmented versions, labelled with the draws")
    apv.add_argument("--data", required=True, help="any data source fedrad reads")
    apv.add_argument("--preset", default="chest-xray", help="augmentation preset")
    apv.add_argument("--overrides", default="", help="e.g. 'rotation_deg=15 elastic_p=1'")
    apv.add_argument("--out", required=True, help="PNG file to write")
    apv.add_argument("--images", type=_at_least_one, default=4, help="images shown, one row each")
    apv.add_argument("--views", type=_at_least_one, default=5, help="augmented versions of each image")
    apv.add_argument("--image-size", type=int, default=128, help="side of each tile's image in pixels")
    apv.add_argument("--class-names", help="comma-separated class names (default: the data's own)")
    apv.add_argument("--seed", type=int, default=0, help="seed of the augmentation draws")
    apv.set_defaults(func=_augment_preview)

    prd = sub.add_parser("predict", help="class probabilities (and Grad-CAM heatmaps) for images, locally")
    prd.add_argument("--model", required=True, help="a fedrad model.pt")
    prd.add_argument("paths", nargs="+", metavar="PATH", help="DICOM, PNG or JPEG files or folders")
    prd.add_argument("--json", help="also write the predictions to this JSON file")
    prd.add_argument("--heatmap", metavar="DIR", help="write a Grad-CAM overlay PNG per image here")
    prd.add_argument("--threshold", type=_probability, help="decide the positive class at this probability "
                     "(default: the operating point stored in model.pt, else the argmax)")
    prd.set_defaults(func=_predict)

    rp = sub.add_parser("report", help="one self-contained report.html for one or more run directories")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="HTML file to write (default FIRST_RUN_DIR/report.html)")
    rp.set_defaults(func=_report)

    certs = sub.add_parser("certs", help="TLS certificates for the study and hospital authentication keys")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    ci = certs_sub.add_parser("init", help="a study CA and the server certificate")
    ci.add_argument("--out", required=True, help="folder to write ca.crt, ca.key, server.crt and server.key to")
    ci.add_argument("--server-name", required=True, metavar="HOST[,IP...]",
                    help="every name and address hospitals will use to reach the server")
    ci.set_defaults(func=_certs_init)
    cn = certs_sub.add_parser("node", help="a hospital's authentication key pair (P-384)")
    cn.add_argument("--out", required=True, help="folder to write SITE.key (stays here) and SITE.pub to")
    cn.add_argument("--site", required=True, help="this hospital's name, as the study will know it")
    cn.set_defaults(func=_certs_node)

    server = sub.add_parser("server", help="the coordinating server (Flower SuperLink)")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    ss = server_sub.add_parser(
        "start", help="start the SuperLink (TLS, hospital authentication) on 127.0.0.1 and the hospitals' door",
        description="The SuperLink listens on 127.0.0.1 (--control-port) only; hospitals reach it through the "
        "front door (nginx, --host:--port), which forwards Flower's Fleet API and /health and refuses "
        "everything else. Both run until this command is stopped.")
    ss.add_argument("--certs", help="folder from 'fedrad certs init'")
    ss.add_argument("--state", required=True, help="folder for the SuperLink's database and the door's config and "
                    "access log (kept private: 0700, files 0600)")
    ss.add_argument("--host", default="0.0.0.0", help="address the hospitals' door listens on")
    ss.add_argument("--port", type=int, default=8000, help="port of the hospitals' door")
    ss.add_argument("--control-port", type=int, default=9093, help="the SuperLink's own port, on 127.0.0.1 only: "
                    "'fedrad server run' and 'flwr' connect here")
    ss.add_argument("--no-front-door", action="store_true", help="no door: the SuperLink on 127.0.0.1 alone "
                    "(hospitals on this machine only; no nginx needed)")
    ss.add_argument("--insecure", action="store_true", help="plain text, no authentication (test networks only)")
    ss.set_defaults(func=_server_start)
    sr = server_sub.add_parser(
        "run", help="submit a study to the SuperLink (or resume a stopped one) and stream its progress",
        description="Submit a new study (--config) or continue a stopped one from its last checkpoint (--resume). "
        "A resumed study keeps its study id, settings and run directory; sites that already trained a round "
        "send the same update again instead of spending privacy budget twice.")
    sr.add_argument("--server", required=True, metavar="HOST:PORT", help="the SuperLink to submit to")
    sr.add_argument("--certs", help="folder with the study's ca.crt")
    sr.add_argument("--config", help="study TOML for a new study: any keys of [tool.flwr.app.config]")
    sr.add_argument("--out", default="", help="run directory on the server machine (absolute path)")
    sr.add_argument("--resume", metavar="RUN_DIR", help="continue the study in RUN_DIR (its config.json, on this "
                    "machine) at the round after its last checkpoint")
    sr.add_argument("--insecure", action="store_true", help="plain text (test networks only)")
    sr.set_defaults(func=_server_run)

    client = sub.add_parser("client", help="a hospital's node (Flower SuperNode)")
    client_sub = client.add_subparsers(dest="client_command", required=True)
    cs = client_sub.add_parser("start", help="start this hospital's SuperNode")
    cs.add_argument("--server", required=True, metavar="HOST:PORT", help="the study's server, as the "
                    "coordinator gave it")
    cs.add_argument("--ca", help="the study's ca.crt")
    cs.add_argument("--key", help="this hospital's private key from 'fedrad certs node'")
    cs.add_argument("--site", required=True, help="this hospital's name in the study")
    cs.add_argument("--data", required=True, help="this hospital's images: a folder or an .npz")
    cs.add_argument("--state", required=True, help="privacy ledger and audit log live here")
    cs.add_argument("--policy", help="this hospital's privacy policy (TOML); default STATE/policy.toml where it "
                    "exists, else the safe defaults ('fedrad policy show' prints them)")
    cs.add_argument("--max-epsilon", type=float, default=0.0,
                    help="this hospital's lifetime budget per dataset, over the policy's; 0 means the policy's "
                    "(default 8), never the study's")
    cs.add_argument("--port", type=int, default=9094, help="the SuperNode's local API port (on 127.0.0.1); several "
                    "hospitals on one machine need one each")
    cs.add_argument("--insecure", action="store_true", help="plain text (test networks only)")
    cs.set_defaults(func=_client_start)
    cd = client_sub.add_parser("digest", help="print the code digest of a fedrad checkout or app bundle, as a "
                               "node compares it (to approve a release: the policy's [code] approved)")
    cd.add_argument("path", nargs="?", help="a checkout folder or a .fab file; default the installed fedrad")
    cd.set_defaults(func=_client_digest)

    pol = sub.add_parser("policy", help="a hospital's privacy policy")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    ps = pol_sub.add_parser("show", help="print the effective policy a node started this way would enforce")
    ps.add_argument("--policy", help="policy file (TOML); default STATE/policy.toml where it exists")
    ps.add_argument("--state", default=".", help="the node's state dir")
    ps.add_argument("--max-epsilon", type=float, default=0.0, help="as 'fedrad client start --max-epsilon'")
    ps.set_defaults(func=_policy_show)

    pr = sub.add_parser("privacy", help="show a hospital's privacy ledger")
    pr.add_argument("--state-dir", required=True, help="a state dir, or a run dir holding simulated sites")
    pr.set_defaults(func=_privacy)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedrad.interrupt import catch_signals, interrupted

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # which options were given (simulate --resume)
    catch_signals()  # one Ctrl-C or SIGTERM ends the command within seconds (fedrad/interrupt.py)
    try:
        return _run(args)
    except FedradError as exc:
        print(f"fedrad: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return interrupted(exc)


def _run(args: argparse.Namespace) -> int:
    """The subcommand, with progress of long work on stderr. A ConfigError about a setting that one of its
    options sets names the option (--rounds, not num-rounds); a resumed study's settings come from its run
    directory, so they keep their config keys."""
    report_progress()
    try:
        return args.func(args)
    except ConfigError as exc:
        raise exc.naming({} if getattr(args, "resume", None) else getattr(args, "options", {})) from None


if __name__ == "__main__":
    sys.exit(main())
