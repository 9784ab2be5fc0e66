"""The ``runwatch`` command. Every listing takes ``--json`` for scripts.

    runwatch daemon [--config FILE] [--socket PATH] [--state-dir DIR] ...
    runwatch status [--json]
    runwatch runs [--all] [--json]
    runwatch alerts [--run NAME] [--limit N] [--json]
    runwatch rules check [PATH ...] [--json]
    runwatch rules test FILE ... [--json]
    runwatch rules list [--json]
    runwatch silence add --match run=X [--match ...] --for 2h [--comment TEXT]
    runwatch silence list [--all] [--json] | runwatch silence expire ID
    runwatch notifications [--json]
    runwatch pause RUN | resume RUN | rewind RUN [--to STEP] [--lr-scale X] [--skip N]
    runwatch skip-shard RUN SHARD
    runwatch incidents [--run NAME] [--json] | runwatch incident show ID [--json]
    runwatch checkpoints RUN [--json] | retention plan RUN [--json] | pin RUN STEP | unpin RUN STEP
    runwatch manifest DATA_DIR [--verify [--shard S]] [--json]
    runwatch report RUN [--incident ID] [--out DIR] [--json]   (reads the store; no daemon needed)
    runwatch history RUN METRIC [--rank R] [--resolution raw|1m|1h] [--since 2h] [--json]   (reads the store)
    runwatch demo
    runwatch drift list [--run NAME] [--json]
    runwatch drift freeze RUN MONITOR [--rank R] (--steps A:B | --from-run RUN2 [--from-rank R2]) [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from runwatch.daemon import __version__, dashboards, paths, report, systemd_install
from runwatch.daemon.client import Client, DaemonUnreachable
from runwatch.daemon.config import ConfigError, load_settings

EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_RULES = 4
EXIT_USAGE = 5
EXIT_PENDING = 6  # a command was sent but the run did not apply it within --wait
EXIT_FAILED = 7  # the run reported that it could not apply the command


PIPED_WIDTH = 200  # rich squeezes tables to 80 columns off a terminal and would cut run names


def _console() -> Console:
    """Standard output's console: a terminal's own width, or wide enough when piped to grep or a file."""
    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, help="daemon socket (default: $RUNWATCH_SOCKET or the "
                   "per-user / systemd location)")


def _query(args: argparse.Namespace, op: str, **kw: Any) -> dict[str, Any]:
    with Client(paths.client_socket_path(args.socket)) as client:
        return client.query(op, **kw)


def _daemon_call(args: argparse.Namespace, op: str, **kw: Any) -> dict[str, Any] | None:
    """The daemon's reply to a query, or None once the failure is printed (unreachable, refused)."""
    try:
        reply = _query(args, op, **kw)
    except DaemonUnreachable as exc:
        Console(stderr=True).print(f"[red]runwatch daemon is not reachable[/red]: {exc}")
        return None
    if "error" in reply:
        print(f"runwatch: {reply['error']}", file=sys.stderr)
        return None
    return reply


# -- daemon ----------------------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from runwatch.daemon.service import Daemon, StartupError

    flags = {
        "socket": args.socket,
        "state_dir": args.state_dir,
        "exporter_address": args.exporter_address,
        "exporter_port": args.exporter_port,
        "log_level": args.log_level,
        "rules": args.rules,
        "rules_enabled": False if args.no_rules else None,
        "retention_enabled": False if args.retention_dry_run else None,
    }
    try:
        settings = load_settings(args.config, **flags)
    except ConfigError as exc:
        print(f"runwatch daemon: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    daemon = Daemon(settings, reload=lambda: load_settings(args.config, **flags),
                    config_path=args.config)
    try:
        daemon.run()
    except StartupError as exc:
        print(f"runwatch daemon: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    return 0


# -- status / runs ---------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    path = paths.client_socket_path(args.socket)
    try:
        status = _query(args, "status")
    except DaemonUnreachable as exc:
        if args.json:
            _print_json({"reachable": False, "socket": str(path), "error": str(exc)})
        else:
            Console(stderr=True).print(f"[red]runwatch daemon is not reachable[/red]: {exc}")
        return EXIT_UNREACHABLE
    status["reachable"] = True
    if args.json:
        _print_json(status)
        return 0
    d, i = status["daemon"], status["ingest"]
    table = Table(title=f"runwatch daemon {d['version']} (pid {d['pid']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("socket", d["socket"])
    table.add_row("exporter", d["exporter"] or "off")
    table.add_row("store", f"{d['store']} ({d['store_bytes'] / 1e6:.1f} MB)")
    table.add_row("uptime", f"{d['uptime_seconds']:.0f} s")
    table.add_row("connections", str(i["connections"]))
    table.add_row("points stored", f"{i['points_total']:,}")
    rejected = i["rejected_frames_total"]
    table.add_row("frames rejected",
                  ", ".join(f"{k}={v}" for k, v in rejected.items()) if rejected else "0")
    table.add_row("live runs", str(status["runs"]["live"]))
    rules = status.get("rules") or {}
    if rules.get("enabled"):
        table.add_row("rules", f"{rules['loaded']} in force, {rules['firing']} firing"
                      + (f", {rules['refused_files']} file(s) refused" if rules["refused_files"] else ""))
    node = status.get("node")
    if node is not None:
        if node["gpus"]:
            for g in node["gpus"]:
                util = g.get("gpu_utilization")
                mem = g.get("gpu_memory_used_bytes")
                table.add_row(f"GPU {g['index']}", f"{g['name']}: {util if util is not None else '?'}% busy,"
                              f" {(mem or 0) / 2**30:.1f} GiB used, {len(g['processes'])} process(es)")
        else:
            table.add_row("GPUs", f"no GPU visible: {node['no_gpu_reason']}")
    notify = status.get("notify")
    if notify:
        outbox = ", ".join(f"{v} {k}" for k, v in sorted(notify["outbox"].items())) or "empty"
        table.add_row("receivers", ", ".join(f"{k} ({v})" for k, v in notify["receivers"].items()))
        table.add_row("outbox", outbox)
    _console().print(table)
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_runs(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "runs", all=args.all)
    if reply is None:
        return EXIT_UNREACHABLE
    runs = reply["runs"]
    if args.json:
        _print_json(runs)
        return 0
    if not runs:
        _console().print("no live runs on this node" + ("" if args.all else " (--all shows past ones)"))
        return 0
    table = Table(title="runs on this node")
    for col in ("run", "ranks", "last step", "steps/s", "last seen", "loss", "grad norm", "lr"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in runs:
        latest = r["latest"]
        lr = next((v for k, v in sorted(latest.items()) if k.startswith("learning_rate")), "")
        seen = r["seconds_since_last_step"]
        table.add_row(
            r["run"],
            f"{r['connected']}/{r['world_size']}",
            str(r["last_step"]),
            _fmt(r["steps_per_second"]),
            "-" if seen is None else f"{seen:.0f}s ago",
            _fmt(latest.get("loss", "")),
            _fmt(latest.get("grad_norm", "")),
            _fmt(lr),
        )
    _console().print(table)
    return 0


# -- alerts ----------------------------------------------------------------------------

_SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def cmd_alerts(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "alerts", run=args.run, limit=args.limit)
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
        return 0
    console = _console()
    if not reply.get("enabled", True):
        console.print("rules are switched off on this daemon (rules_enabled = false)")
        return 0
    firing = reply["firing"]
    if firing:
        table = Table(title="firing now")
        for col in ("severity", "rule", "run", "rank", "step", "summary", "actions"):
            table.add_column(col)
        for a in firing:
            style = _SEVERITY_STYLE.get(a["severity"], "")
            table.add_row(f"[{style}]{a['severity']}[/]", a["rule"], a["run"], str(a["rank"]), str(a["step"]),
                          a["summary"], ", ".join(a["actions"]))
        console.print(table)
    else:
        console.print("nothing is firing")
    recent = reply["recent"]
    if recent:
        table = Table(title=f"last {len(recent)} firings and resolutions, newest first")
        for col in ("when", "state", "severity", "rule", "run", "rank", "step", "summary"):
            table.add_column(col)
        for e in recent:
            style = _SEVERITY_STYLE.get(e["severity"], "")
            when = time.strftime("%m-%d %H:%M:%S", time.localtime(e["time"]))
            table.add_row(when, e["state"], f"[{style}]{e['severity']}[/]", e["rule"], e["run"],
                          str(e["rank"]), str(e["step"]), e["summary"])
        console.print(table)
    return 0


# -- rules -----------------------------------------------------------------------------


def cmd_rules_check(args: argparse.Namespace) -> int:
    from runwatch.daemon.rules.spec import load_rules

    targets = args.paths or [paths.default_rules_dir()]
    rules, errors = load_rules(targets)
    problems = [f"{p}:{line}: {reason}" if line else f"{p}: {reason}"
                for err in errors for p, line, reason in err.problems]
    if args.json:
        _print_json({"ok": not errors, "rules": len(rules), "errors": problems})
    else:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(rules)} rules OK" + (f"; {len(errors)} file(s) refused" if errors else "")
              + f" ({', '.join(map(str, targets))})")
    return EXIT_RULES if errors else 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    from runwatch.daemon.rules.fixture import run_file
    from runwatch.daemon.rules.spec import RuleError

    files = [f for p in args.files for f in (sorted(p.glob("*.test.yaml")) if p.is_dir() else [p])]
    results: list[dict[str, Any]] = []
    failed = broken = 0
    for path in files:
        try:
            outcomes = run_file(path)
        except (OSError, RuleError) as exc:
            broken += 1
            results.append({"file": str(path), "error": str(exc)})
            if not args.json:
                print(f"ERROR {path}:\n{exc}", file=sys.stderr)
            continue
        for o in outcomes:
            failed += not o.passed
            results.append({"file": str(path), "test": o.name, "passed": o.passed, "explain": o.explain()})
            if not args.json:
                print(f"{'PASS' if o.passed else 'FAIL'} {path.name}: {o.name}")
                if not o.passed:
                    print(o.explain())
    if args.json:
        _print_json({"ok": not failed and not broken, "results": results})
    else:
        passed = sum(1 for r in results if r.get("passed"))
        print(f"{passed} passed, {failed} failed" + (f", {broken} file(s) in error" if broken else ""))
    if not files:
        print("no test files given", file=sys.stderr)
        return EXIT_RULES
    return EXIT_RULES if failed or broken else 0


def cmd_rules_list(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "rules")
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
        return 0
    table = Table(title="rules in force")
    for col in ("rule", "severity", "actions", "version", "file"):
        table.add_column(col)
    for r in reply["rules"]:
        style = _SEVERITY_STYLE.get(r["severity"], "")
        table.add_row(r["name"], f"[{style}]{r['severity']}[/]", ", ".join(r["actions"]), r["version"],
                      f"{r['file']}:{r['line']}")
    _console().print(table)
    for line in reply["errors"]:
        Console(stderr=True).print(f"[red]refused[/red] {line}")
    return 0


# -- silences and notifications -----------------------------------------------------------


def _matchers(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        label, sep, value = item.partition("=")
        if not sep or not label:
            raise ValueError(f"--match {item!r}: write label=value (or label=~regex)")
        out[label] = value
    return out


def cmd_silence_add(args: argparse.Namespace) -> int:
    from runwatch.daemon.rules.spec import parse_seconds

    try:
        matchers = _matchers(args.match)
        seconds = parse_seconds(args.duration)
    except ValueError as exc:
        print(f"runwatch silence add: {exc}", file=sys.stderr)
        return EXIT_USAGE
    reply = _daemon_call(args, "silence_add", matchers=matchers, seconds=seconds, comment=args.comment)
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
    else:
        print(f"silence {reply['id']}: {matchers} for {args.duration}")
    return 0


def cmd_silence_list(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "silences")
    if reply is None:
        return EXIT_UNREACHABLE
    silences = [x for x in reply["silences"] if args.all or x["active"]]
    if args.json:
        _print_json(silences)
        return 0
    if not silences:
        print("no active silences" + ("" if args.all else " (--all shows expired ones)"))
        return 0
    table = Table(title="silences")
    for col in ("id", "matchers", "until", "by", "comment", "active"):
        table.add_column(col)
    for x in silences:
        table.add_row(str(x["id"]), ", ".join(f"{k}={v}" for k, v in x["matchers"].items()),
                      time.strftime("%m-%d %H:%M", time.localtime(x["ends_at"])), x["created_by"],
                      x["comment"], "yes" if x["active"] else "no")
    _console().print(table)
    return 0


def cmd_silence_expire(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "silence_expire", id=args.id)
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
    elif reply["expired"]:
        print(f"silence {args.id} expired")
    else:
        print(f"silence {args.id}: no such active silence", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_notifications(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "notifications", limit=args.limit)
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
        return 0
    counts = reply["counts"]
    print("receivers: " + ", ".join(f"{k} ({v})" for k, v in reply["receivers"].items())
          + "; outbox: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "empty"))
    table = Table(title="notifications, newest first")
    for col in ("id", "receiver", "state", "attempts", "reason", "firing", "resolved", "last error"):
        table.add_column(col)
    for n in reply["outbox"]:
        table.add_row(str(n["id"]), n["receiver"], n["state"], str(n["attempts"]), n["reason"],
                      str(n["firing"]), str(n["resolved"]), n["last_error"] or "")
    _console().print(table)
    return 0


# -- demo ------------------------------------------------------------------------------


# -- interventions -------------------------------------------------------------------------


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_control(args: argparse.Namespace) -> int:
    """pause / resume / rewind / skip-shard: send, then wait for the run to apply it."""
    action = args.action
    cmd_args: dict[str, Any] = {}
    if action == "rewind":
        cmd_args = {"to": args.to if args.to is not None else "last_clean", "skip_batches": args.skip,
                    "resume": not args.stay_paused}
        if args.lr_scale is not None:
            cmd_args["lr_scale"] = args.lr_scale
    elif action == "skip_shard":
        cmd_args = {"shard": int(args.shard) if args.shard.isdigit() else args.shard}
    sent = _daemon_call(args, "control", run=args.run, action=action, params=cmd_args)
    if sent is None:
        return EXIT_UNREACHABLE
    cid = sent["command"]
    deadline = time.monotonic() + args.wait
    found: dict[str, Any] = {"state": "pending"}
    while True:
        reply = _daemon_call(args, "command", id=cid)
        if reply is None:
            return EXIT_UNREACHABLE
        found = reply["command"]
        if found["state"] != "pending" or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if args.json:
        _print_json({**found, "incident": sent.get("incident")})
    elif found["state"] == "pending":
        print(f"{action} sent to {args.run} as command {cid}; not applied yet (the run applies it at "
              "its next step boundary; `runwatch incidents` shows when)")
    elif found["state"] == "applied":
        result = found.get("result") or {}
        extra = ""
        if action == "rewind":
            state = "resumed" if result.get("resumed") else "paused"
            extra = (f": checkpoint of step {result.get('checkpoint_step')},"
                     f" learning rate x{result.get('lr_scale')}, {state}")
        print(f"{action} applied to {args.run} before step {found['step']}{extra} (command {cid}"
              + (f", incident {sent['incident']})" if sent.get("incident") else ")"))
    else:
        print(f"{action} failed on {args.run}: {result_detail(found)}", file=sys.stderr)
    return {"pending": EXIT_PENDING, "applied": 0}.get(found["state"], EXIT_FAILED)


def result_detail(command: dict[str, Any]) -> str:
    return str((command.get("result") or {}).get("detail") or command.get("state"))


def cmd_incidents(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "incidents", run=args.run, limit=args.limit)
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
        return 0
    table = Table(title="incidents")
    for col in ("id", "run", "state", "rule", "step", "rewinds", "opened", "summary"):
        table.add_column(col)
    for i in reply["incidents"]:
        table.add_row(str(i["id"]), i["run"], i["state"], i["rule"], str(i["first_step"]), str(i["rewinds"]),
                      _when(i["opened"]), i["summary"][:80])
    _console().print(table)
    return 0


def cmd_incident_show(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "incident", id=args.id)
    if reply is None:
        return EXIT_UNREACHABLE
    inc = reply["incident"]
    if args.json:
        _print_json(inc)
        return 0
    console = _console()
    console.print(f"[bold]incident {inc['id']}[/bold] on run [bold]{inc['run']}[/bold]: {inc['state']}"
                  f" (rule {inc['rule']}, step {inc['first_step']}, {inc['rewinds']} rewinds)")
    console.print(inc["summary"])
    table = Table(title="timeline")
    table.add_column("time")
    table.add_column("what")
    table.add_column("")
    for t in inc["timeline"]:
        table.add_row(_when(t["time"]), t["kind"], t["text"])
    console.print(table)
    for c in inc["commands"]:
        if c["action"] == "dump_batch" and c.get("result") and c["result"].get("path"):
            console.print(f"dumped batch: {c['result']['path']}")
    for t in inc["timeline"]:
        if t["kind"] == "dump":  # a rank's stack dump (one entry per rank)
            result = t["detail"].get("result", {})
            for name in result.get("files", []):
                console.print(f"rank {t['detail'].get('rank')} dump: {Path(result.get('path', '')) / name}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "checkpoints", run=args.run)
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
        return 0
    control = reply.get("control") or {}
    table = Table(title=f"checkpoints of {args.run}" + (f" in {control['checkpoint_dir']}"
                                                        if control.get("checkpoint_dir") else ""))
    for col in ("step", "size", "age", "state", "kept because / goes because", "path"):
        table.add_column(col)
    now = time.time()
    # The retention manager's view (every checkpoint in the folder), else what the run registered.
    rows = reply.get("retention") or [{**c, "state": "registered", "reason": "", "keep": 1}
                                      for c in reply["checkpoints"]]
    for c in rows:
        size = f"{(c['size_bytes'] or 0) / 1e6:.1f} MB"
        age = f"{(now - c['saved_at']) / 3600:.1f} h" if c.get("saved_at") else "-"
        why = c["reason"] if c["keep"] else f"[red]{c['reason']}[/red]"
        table.add_row(str(c["step"]), size, age, c["state"], why, c["path"])
    # What left the folder: in the trash (not purged yet), quarantined by a rewind, or lost.
    for g in reply.get("gone") or []:
        size = f"{g['size_bytes'] / 1e6:.1f} MB" if g.get("size_bytes") is not None else "-"
        age = f"{(now - g['saved_at']) / 3600:.1f} h" if g.get("saved_at") else "-"
        why = {"trash": f"deleted: {g['reason']}; in the trash until purged"}.get(g["state"], g["reason"])
        why += f"; {g['note']}" if g.get("note") else ""
        table.add_row(str(g["step"]), size, age, g["state"], f"[red]{why}[/red]", g["path"])
    _console().print(table)
    if control:
        print(f"run state: {control['state']}, learning-rate scale x{control['lr_scale']:g}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "pin" if args.pin else "unpin", run=args.run, step=args.step)
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
    else:
        print(f"{args.run} step {args.step}: {'pinned (never deleted)' if args.pin else 'unpinned'}")
    return 0


def cmd_retention_plan(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "retention_plan", run=args.run)
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
        return 0
    dry = "" if reply["enabled"] else " (dry run: deletes nothing)"
    table = Table(title=f"retention plan for {args.run}{dry}")
    for col in ("step", "size", "", "why"):
        table.add_column(col)
    for d in reply["decisions"]:
        verdict = "keep" if d["keep"] else "[red]delete[/red]"
        table.add_row(str(d["step"]), f"{d['size_bytes'] / 1e6:.1f} MB", verdict, d["reason"])
    _console().print(table)
    print(f"would free {reply['freed_bytes'] / 1e6:.1f} MB, keep {reply['kept_bytes'] / 1e6:.1f} MB")
    for incident in reply["no_rollback_target"]:
        print(f"incident {incident}: no clean checkpoint before it exists", file=sys.stderr)
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from runwatch.daemon.manifest import ManifestError, verify_manifest, write_manifest

    try:
        if not args.verify:
            path = write_manifest(args.data_dir)
            if args.json:
                _print_json({"manifest": str(path)})
            else:
                print(f"wrote {path}")
            return 0
        checks = verify_manifest(args.data_dir, args.shard)
    except (ManifestError, OSError) as exc:
        print(f"runwatch manifest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    bad = [c for c in checks if c.status != "match"]
    if args.json:
        _print_json({"checks": [{"path": c.path, "status": c.status, "detail": c.detail} for c in checks],
                     "ok": not bad})
    else:
        for c in checks:
            if c.status != "match" or args.shard is not None:
                print(f"{c.status:9} {c.path}  {c.detail}")
        print(f"{len(checks) - len(bad)} match, {len(bad)} differ")
    return 0 if not bad else EXIT_FAILED


def cmd_drift_list(args: argparse.Namespace) -> int:
    reply = _daemon_call(args, "drift", run=args.run)
    if reply is None:
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
        return 0
    table = Table(title="drift monitors")
    for col in ("run", "rank", "monitor", "phase", "reference", "last PSI", "warn at", "state",
                "worst shard"):
        table.add_column(col)
    for m in reply["monitors"]:
        ref, last, worst = m["reference"], m["last_window"], m["worst_shard"]
        table.add_row(m["run"], str(m["rank"]), m["monitor"], "off" if m["broken"] else m["phase"],
                      (f"{ref['source']} ({ref['values']} values)" if ref else m["note"] or "-"),
                      f"{last['psi']:.4f}" if last else "-", f"{last['warn_threshold']:.4f}" if last else "-",
                      ("ok", "warning", "critical")[last["state"]] if last else "-",
                      f"{worst['shard']} (state {worst['state']}, PSI {worst['psi']:.3f})" if worst else "-")
    _console().print(table)
    return 0


def cmd_drift_freeze(args: argparse.Namespace) -> int:
    if args.steps is None and args.from_run is None:
        print("runwatch drift freeze: give --steps FIRST:LAST, --from-run RUN, or both", file=sys.stderr)
        return EXIT_USAGE
    reply = _daemon_call(args, "drift_freeze", run=args.run, monitor=args.monitor, rank=args.rank,
                         steps=args.steps, from_run=args.from_run, from_rank=args.from_rank)
    if reply is None:
        return EXIT_FAILED
    if args.json:
        _print_json(reply)
        return 0
    for f in reply["frozen"]:
        print(f"{f['run']} rank {f['rank']} {f['monitor']}: reference frozen from {f['source']}"
              f" ({f['values']} values, {f['bins']} bins)"
              + ("" if f["live"] else "; used when it next reports"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from runwatch.daemon.demo import run_demo

    return run_demo(steps=args.steps)


def cmd_history(args: argparse.Namespace) -> int:
    from runwatch.daemon import history
    from runwatch.daemon.rules.spec import parse_seconds
    from runwatch.daemon.store import Store

    try:
        since = time.time() - parse_seconds(args.since) if args.since else None
        store_path = args.store or load_settings(args.config).store_path
    except (ValueError, ConfigError) as exc:
        print(f"runwatch history: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_CONFIG
    if not store_path.is_file():
        print(f"runwatch history: no store at {store_path}", file=sys.stderr)
        return EXIT_USAGE
    conn = Store.reader(store_path)
    try:
        points = history.points(conn, args.run, args.rank, args.metric, args.resolution, since)
    except history.HistoryError as exc:
        print(f"runwatch history: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        conn.close()
    if args.json:
        _print_json([{k: _json_safe(v) for k, v in p.items()} for p in points])
        return 0
    table = Table(title=f"{args.metric} of {args.run} rank {args.rank}"
                        f" ({args.resolution}, {len(points)} points)")
    if args.resolution == "raw":
        for col in ("step", "time", "value"):
            table.add_column(col, justify="right")
        for p in points:
            table.add_row(str(p["step"]), _clock(p["time"]), f"{p['value']:.6g}")
    else:
        for col in ("bucket", "steps", "mean", "min", "max", "last", "nonfinite"):
            table.add_column(col, justify="right")
        for p in points:
            table.add_row(_clock(p["time"]), f"{p['first_step']}-{p['last_step']} ({p['steps']})",
                          *(f"{p[k]:.6g}" for k in ("mean", "min", "max", "last")), str(p["nonfinite"]))
    _console().print(table)
    return 0


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runwatch", description="Training-run observability.")
    parser.add_argument("--version", action="version", version=f"runwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("daemon", help="run the node daemon in the foreground")
    p.add_argument("--config", type=Path, help="TOML config (default /etc/runwatch/runwatch.toml "
                   "when present)")
    _socket_arg(p)
    p.add_argument("--state-dir", type=Path, help="folder for the SQLite store")
    p.add_argument("--exporter-address", help="Prometheus exporter address (default 127.0.0.1)")
    p.add_argument("--exporter-port", type=int, help="Prometheus exporter port (0 = any free)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--rules", type=Path, action="append",
                   help="rule file or folder (repeatable; default: the shipped pack)")
    p.add_argument("--no-rules", action="store_true", help="judge nothing: store and export only")
    p.add_argument("--retention-dry-run", action="store_true",
                   help="checkpoint retention plans and shows, deletes nothing (retention_enabled = false)")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("status", help="the daemon's health and where it listens")
    _socket_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("runs", help="live runs on this node")
    _socket_arg(p)
    p.add_argument("--all", action="store_true", help="include runs that have gone away")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("alerts", help="rule series firing now, and recent firings and resolutions")
    _socket_arg(p)
    p.add_argument("--run", help="only this run")
    p.add_argument("--limit", type=int, default=50, help="recent events shown (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_alerts)

    rules = sub.add_parser("rules", help="check, test and list rules").add_subparsers(
        dest="rules_command", required=True, metavar="SUBCOMMAND")
    p = rules.add_parser("check", help="validate rule files; file:line: reason on error (exit 4)")
    p.add_argument("paths", nargs="*", type=Path, help="files or folders (default: the shipped pack)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_rules_check)
    p = rules.add_parser("test", help="run rule test files (*.test.yaml); exit 4 on any failure")
    p.add_argument("files", nargs="+", type=Path, help="test files, or folders of *.test.yaml")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_rules_test)
    p = rules.add_parser("list", help="the rules the daemon runs, and refused files")
    _socket_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_rules_list)

    silence = sub.add_parser("silence", help="mute alerts for a while").add_subparsers(
        dest="silence_command", required=True, metavar="SUBCOMMAND")
    p = silence.add_parser("add", help="silence alerts whose labels match")
    _socket_arg(p)
    p.add_argument("--match", action="append", required=True, metavar="LABEL=VALUE",
                   help="run=X, alertname=Y, severity=warning, rank=0, node=...; VALUE ~regex for a regex")
    p.add_argument("--for", dest="duration", required=True, help="how long: 30m, 2h, 1d")
    p.add_argument("--comment", default="", help="why (shown in silence list)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_silence_add)
    p = silence.add_parser("list", help="active silences")
    _socket_arg(p)
    p.add_argument("--all", action="store_true", help="include expired ones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_silence_list)
    p = silence.add_parser("expire", help="end a silence now")
    _socket_arg(p)
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_silence_expire)

    p = sub.add_parser("notifications", help="receivers and the outbox: what was sent, what waits")
    _socket_arg(p)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_notifications)

    for action, help_text in (("pause", "pause a run before its next step (process and GPU memory stay)"),
                              ("resume", "resume a paused run"),
                              ("rewind", "rewind a run to a checkpoint with a lower learning rate"),
                              ("skip-shard", "skip a data shard from the next step on")):
        p = sub.add_parser(action, help=help_text)
        _socket_arg(p)
        p.add_argument("run", help="run name")
        if action == "rewind":
            p.add_argument("--to", type=int, help="checkpoint step (default: the last clean one)")
            p.add_argument("--lr-scale", type=float, help="learning-rate factor (default: the playbook's)")
            p.add_argument("--skip", type=int, default=0, help="batches to skip after the rewind")
            p.add_argument("--stay-paused", action="store_true", help="do not resume after rewinding")
        if action == "skip-shard":
            p.add_argument("shard", help="shard number or name")
        p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the run to apply it")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_control, action=action.replace("-", "_"))

    p = sub.add_parser("incidents", help="interventions: what fired, what was done, how it ended")
    _socket_arg(p)
    p.add_argument("--run")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_incidents)
    incident = sub.add_parser("incident", help="one incident").add_subparsers(
        dest="incident_command", required=True, metavar="SUBCOMMAND")
    p = incident.add_parser("show", help="an incident's timeline, values, dumps and checkpoints")
    _socket_arg(p)
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_incident_show)

    p = sub.add_parser("checkpoints", help="a run's checkpoints: state, why kept or deleted, trash")
    _socket_arg(p)
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_checkpoints)

    for name, pin in (("pin", True), ("unpin", False)):
        p = sub.add_parser(name, help="keep a checkpoint whatever the retention policy says" if pin
                           else "let the retention policy decide about a checkpoint again")
        _socket_arg(p)
        p.add_argument("run")
        p.add_argument("step", type=int)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_pin, pin=pin)
    retention = sub.add_parser("retention", help="checkpoint retention").add_subparsers(
        dest="retention_command", required=True, metavar="SUBCOMMAND")
    p = retention.add_parser("plan", help="what the next retention pass would delete, and why")
    _socket_arg(p)
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retention_plan)

    p = sub.add_parser("history", help="one metric over time: raw steps or 1m/1h rollups (reads the store)")
    p.add_argument("run")
    p.add_argument("metric", help="metric name as stored, e.g. loss or grad_norm")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--resolution", choices=("raw", "1m", "1h"), default="1m")
    p.add_argument("--since", help="only the last 30m, 2h, 7d, ... (default: all kept)")
    p.add_argument("--store", type=Path, metavar="FILE", help="the store file (default: the daemon's)")
    p.add_argument("--config", type=Path, metavar="FILE", help="daemon TOML config, for state_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("manifest", help="write (or --verify) a checksum manifest of a data folder")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--verify", action="store_true", help="compare the files with the manifest")
    p.add_argument("--shard", help="with --verify: only this shard (number or name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_manifest)

    drift = sub.add_parser("drift", help="drift monitors: their references and last windows").add_subparsers(
        dest="drift_command", required=True, metavar="SUBCOMMAND")
    p = drift.add_parser("list", help="each monitor: phase, where its reference came from, last PSI, state")
    _socket_arg(p)
    p.add_argument("--run", help="only this run")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_drift_list)
    p = drift.add_parser("freeze", help="freeze a monitor's reference from a stored step range or from "
                         "another run")
    _socket_arg(p)
    p.add_argument("run", help="the monitored run")
    p.add_argument("monitor", help="histogram name or glob (seq_length, activation_values/*)")
    p.add_argument("--rank", type=int, help="only this rank (default: every rank with the monitor)")
    p.add_argument("--steps", metavar="FIRST:LAST", help="stored steps (inclusive) whose histograms form it")
    p.add_argument("--from-run", help="take them from this run (default: the run itself); without --steps, "
                   "its saved reference")
    p.add_argument("--from-rank", type=int, help="rank of --from-run (default: the same rank)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_drift_freeze)

    p = sub.add_parser("demo", help="a bad batch on a tiny GPT: spike, pause, dump, rewind, resume, report")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.set_defaults(func=cmd_demo)
    report.add_parser(sub)
    systemd_install.add_parser(sub)
    dashboards.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
