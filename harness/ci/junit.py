"""Gate verdicts as JUnit XML, the format every CI system (GitHub Actions test reporters, GitLab,
Jenkins) renders: one testcase per gate x cell, a <failure> with the gate's message when it failed,
<skipped> when there was nothing to judge."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from harness.ci.gates import GateResult


def junit_xml(results: Sequence[GateResult], suite: str, properties: dict[str, str] | None = None,
              time_s: float = 0.0) -> bytes:
    failures = sum(not r.passed for r in results)
    skipped = sum(r.skipped for r in results)
    root = ET.Element("testsuites", name="qharness", tests=str(len(results)), failures=str(failures), errors="0",
                      time=f"{time_s:.3f}")
    ts = ET.SubElement(root, "testsuite", name=f"qharness gates: {suite}", tests=str(len(results)),
                       failures=str(failures), errors="0", skipped=str(skipped), time=f"{time_s:.3f}",
                       hostname=socket.gethostname())
    if properties:
        props = ET.SubElement(ts, "properties")
        for k, v in properties.items():
            ET.SubElement(props, "property", name=str(k), value=str(v))
    for r in results:
        case = ET.SubElement(ts, "testcase", classname=f"qharness.{suite}", name=f"{r.gate} [{r.cell}]", time="0.000")
        if not r.passed:
            ET.SubElement(case, "failure", type="GateViolation", message=r.detail).text = (
                f"gate: {r.gate}\ncell: {r.cell}\nvalue: {r.value}\n{r.detail}")
        elif r.skipped:
            ET.SubElement(case, "skipped", message=r.detail)
        else:
            ET.SubElement(case, "system-out").text = r.detail
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(path: str | Path, results: Sequence[GateResult], suite: str, properties: dict[str, str] | None = None,
                time_s: float = 0.0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(junit_xml(results, suite, properties, time_s))
    return path
