"""Differential runner for scripts/differential.sh.

  diff.py run HOST:PORT OUT.json [SCENARIO...]   run the scenarios, write the transcript
  diff.py compare RABBIT.json WARREN.json         print every difference; exit 1 if any
  diff.py junit REPORT.xml [REPORT.xml...]        compare [rabbitmq] and [warren] outcomes
                                                  of the parametrised pytest suites; exit 1
                                                  on a test RabbitMQ fails (a wrong
                                                  expectation) or only Warren fails
  diff.py cargo RABBIT.log WARREN.log             same for `cargo test` outputs of one run
                                                  against RabbitMQ and one against Warren
"""

from __future__ import annotations

import json
import re
import sys
import traceback
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402


def cmd_run(addr: str, out: str, names: list[str]) -> int:
    host, _, port = addr.rpartition(":")
    params = pika.ConnectionParameters(host=host or "127.0.0.1", port=int(port),
                                       connection_attempts=3, retry_delay=0.5,
                                       socket_timeout=5, heartbeat=0)
    result = {}
    for name, fn in scenarios.SCENARIOS.items():
        if names and name not in names:
            continue
        run_id = "d" + uuid.uuid4().hex[:10]
        obs = scenarios.Observer(run_id)
        error = None
        ctx = None
        try:
            ctx = scenarios.Ctx(params, run_id, obs)
            fn(ctx)
        except Exception:  # noqa: BLE001 - part of the transcript
            error = scenarios.normalise(traceback.format_exc(limit=3).splitlines()[-1], run_id)
        finally:
            if ctx is not None:
                ctx.close()
        result[name] = {"observations": obs.items, "error": error}
    Path(out).write_text(json.dumps(result, indent=1, sort_keys=True, default=repr))
    return 0


def cmd_compare(rabbit: str, warren: str) -> int:
    a = json.loads(Path(rabbit).read_text())
    b = json.loads(Path(warren).read_text())
    diffs = 0
    for name in sorted(set(a) | set(b)):
        ra, rb = a.get(name), b.get(name)
        if ra is None or rb is None:
            print(f"[{name}] only run against {'RabbitMQ' if rb is None else 'Warren'}")
            diffs += 1
            continue
        if ra["error"]:
            print(f"[{name}] the scenario itself failed against RabbitMQ: {ra['error']}")
            diffs += 1
        if rb["error"] != ra["error"] and rb["error"]:
            print(f"[{name}] scenario failed against Warren: {rb['error']}")
            diffs += 1
        oa, ob = ra["observations"], rb["observations"]
        for i in range(max(len(oa), len(ob))):
            xa = oa[i] if i < len(oa) else None
            xb = ob[i] if i < len(ob) else None
            if xa != xb:
                diffs += 1
                key = (xa or xb)[0]
                print(f"[{name}] {key}")
                print(f"    RabbitMQ: {json.dumps(xa[1]) if xa else '<nothing>'}")
                print(f"    Warren:   {json.dumps(xb[1]) if xb else '<nothing>'}")
                if xa and xb and xa[0] != xb[0]:
                    print("    (the transcripts diverge here; later lines are shifted)")
                    break
    total = sum(len(r["observations"]) for r in a.values())
    print(f"scenarios: {len(a)}, observations: {total}, differences: {diffs}")
    return 1 if diffs else 0


PARAM = re.compile(r"^(?P<base>[^\[]+)\[(?P<params>.*)\]$")


def _split(name: str):
    """('test_x', 'rabbitmq', 'rest-of-params') from 'test_x[rabbitmq-rest]'."""
    m = PARAM.match(name)
    if not m:
        return name, None, ""
    params = m.group("params")
    for broker in ("warren", "rabbitmq"):
        if params == broker:
            return m.group("base"), broker, ""
        if params.startswith(broker + "-"):
            return m.group("base"), broker, params[len(broker) + 1:]
    return name, None, ""


def cmd_junit(reports: list[str]) -> int:
    outcome: dict[tuple, dict[str, str]] = {}
    for report in reports:
        root = ET.parse(report).getroot()
        for case in root.iter("testcase"):
            base, broker, rest = _split(case.get("name", ""))
            if broker is None:
                continue
            key = (case.get("classname", ""), base, rest)
            state = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    state = "failed"
                    msg = (child.get("message") or "").splitlines()
                    state += ": " + (msg[0][:300] if msg else "")
                    break
                if child.tag == "skipped":
                    state = "skipped"
            outcome.setdefault(key, {})[broker] = state
    wrong, differ, ok, skipped = [], [], 0, 0
    for key, res in sorted(outcome.items()):
        r, w = res.get("rabbitmq", "missing"), res.get("warren", "missing")
        name = f"{key[0]}::{key[1]}" + (f"[{key[2]}]" if key[2] else "")
        if r.startswith("skipped") or w.startswith("skipped") or "missing" in (r, w):
            skipped += 1
            continue
        if r.startswith("failed"):
            wrong.append((name, r, w))
        elif w.startswith("failed"):
            differ.append((name, w))
        else:
            ok += 1
    for name, r, w in wrong:
        print(f"EXPECTATION NOT RABBITMQ'S: {name}\n    rabbitmq {r}\n    warren   {w}")
    for name, w in differ:
        print(f"WARREN DIFFERS: {name}\n    {w}")
    print(f"pytest: {ok} agree, {len(differ)} Warren differences, {len(wrong)} tests failing "
          f"against RabbitMQ, {skipped} skipped or unpaired")
    if skipped and not ok:
        print("no test ran against both brokers: is RABBITMQ_ADDR set?")
        return 1
    return 1 if (wrong or differ) else 0


CARGO_LINE = re.compile(r"^test (?P<name>\S+) \.\.\. (?P<res>ok|FAILED|ignored)")
CARGO_BIN = re.compile(r"Running (?:unittests )?\S*?(?:tests/)?(?P<bin>[\w-]+)(?:\.rs)? \(")


def _cargo(path: str) -> dict[str, str]:
    res, current = {}, "?"
    for line in Path(path).read_text(errors="replace").splitlines():
        m = CARGO_BIN.search(line)
        if m:
            current = m.group("bin")
        m = CARGO_LINE.match(line.strip())
        if m:
            res[f"{current}::{m.group('name')}"] = m.group("res")
    return res


def cmd_cargo(rabbit: str, warren: str) -> int:
    a, b = _cargo(rabbit), _cargo(warren)
    bad = 0
    for name in sorted(set(a) | set(b)):
        ra, rb = a.get(name, "missing"), b.get(name, "missing")
        if ra == "FAILED":
            print(f"EXPECTATION NOT RABBITMQ'S: {name} (warren: {rb})")
            bad += 1
        elif rb != ra and "missing" not in (ra, rb):
            print(f"WARREN DIFFERS: {name} (rabbitmq {ra}, warren {rb})")
            bad += 1
    print(f"cargo: {len(set(a) & set(b))} tests run against both, {bad} differences")
    if not a or not b:
        print("a cargo run produced no test results")
        return 1
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "run":
        return cmd_run(argv[1], argv[2], argv[3:])
    if len(argv) == 3 and argv[0] == "compare":
        return cmd_compare(argv[1], argv[2])
    if len(argv) >= 2 and argv[0] == "junit":
        return cmd_junit(argv[1:])
    if len(argv) == 3 and argv[0] == "cargo":
        return cmd_cargo(argv[1], argv[2])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
