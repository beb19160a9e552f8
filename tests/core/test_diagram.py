"""The playbook diagram's DOT text, read back: every stage, allowed transition, sequence and step is drawn (pure)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest

from nurture.diagram import duration_text, playbook_dot, quoted
from nurture.lifecycle import transition_table
from nurture.playbook import Playbook, Stage, parse_playbook
from tests.conftest import PLAYBOOK_PATH

# A DOT string with its escapes, a bare word, or an attribute list.
_STRING = r'"(?:[^"\\]|\\.)*"'
_NODE = re.compile(rf"^\s*({_STRING})\s*(\[.*\])?;$")
_EDGE = re.compile(rf"^\s*({_STRING})\s*->\s*({_STRING})\s*(\[.*\])?;$")
_ATTR = re.compile(rf"(\w+)=({_STRING}|[^,\]\s]+)")
_CLUSTER_LABEL = re.compile(rf"^\s*label=({_STRING});")


def _text(value: str) -> str:
    """A DOT value as the text Graphviz shows: quotes off, escapes read, ``\\n`` a line break."""
    if not value.startswith('"'):
        return value
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value[1:-1])


@dataclass
class Graph:
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    edges: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    clusters: list[str] = field(default_factory=list)


def parse(dot: str) -> Graph:
    """Read back the statements ``playbook_dot`` writes: nodes, edges and cluster labels, one per line."""
    graph = Graph()
    lines = dot.splitlines()
    assert lines[0] == "digraph playbook {"
    assert lines[-1] == "}"
    for line in lines[1:-1]:
        if edge := _EDGE.match(line):
            attrs = {k: _text(v) for k, v in _ATTR.findall(edge.group(3) or "")}
            graph.edges.append((_text(edge.group(1)), _text(edge.group(2)), attrs))
        elif node := _NODE.match(line):
            graph.nodes[_text(node.group(1))] = {k: _text(v) for k, v in _ATTR.findall(node.group(2) or "")}
        elif label := _CLUSTER_LABEL.match(line):
            graph.clusters.append(_text(label.group(1)))
    return graph


def _edge(graph: Graph, source: str, target: str) -> dict[str, str]:
    found = [attrs for s, t, attrs in graph.edges if (s, t) == (source, target)]
    assert len(found) == 1, (source, target, graph.edges)
    return found[0]


def test_every_stage_and_every_allowed_transition_is_drawn(playbook: Playbook) -> None:
    graph = parse(playbook_dot(playbook))
    for stage in Stage:
        assert graph.nodes[f"stage:{stage}"]["label"].startswith(str(stage))
    assert "enter at score ≥ 40" in graph.nodes["stage:warm"]["label"]
    assert "leave below 60" in graph.nodes["stage:hot"]["label"]
    drawn = sorted(
        (s.removeprefix("stage:"), a["label"], t.removeprefix("stage:"))
        for s, t, a in graph.edges
        if s.startswith("stage:") and t.startswith("stage:")
    )
    assert drawn == transition_table()
    assert _edge(graph, "stage:hot", "stage:cold")["style"] == "dashed"  # back
    assert _edge(graph, "stage:cold", "stage:hot")["style"] == "bold"  # skipping ahead


def test_every_sequence_and_step_is_drawn_with_its_delay(playbook: Playbook) -> None:
    graph = parse(playbook_dot(playbook))
    for name, sequence in playbook.sequences.items():
        [cluster] = [c for c in graph.clusters if c.splitlines()[0] == name]
        assert sequence.description in cluster
        for step in sequence.steps:
            label = graph.nodes[f"{name}/{step.id}"]["label"].splitlines()
            assert label[:2] == [step.id, f"after {duration_text(step.after)}"]
        # Bound to its stage, labelled with the transitions that start it.
        started_by = _edge(graph, f"stage:{sequence.stage}", f"{name}/{sequence.steps[0].id}")["label"]
        for source, _event, target in transition_table():
            if any(t.matches(Stage(source), Stage(target)) for t in sequence.triggers):
                assert f"{source} → {target}" in started_by.splitlines()
    assert "goal: demo_request" in next(c for c in graph.clusters if c.startswith("welcome\n"))
    assert "after 8d" in graph.nodes["win_back/win_back_last"]["label"]


def test_branches_skips_and_split_tests_are_drawn(playbook: Playbook) -> None:
    graph = parse(playbook_dot(playbook))
    welcome = graph.nodes["welcome/welcome"]["label"]
    assert "split test: a 50%, b 50%" in welcome
    assert "then waits 3d for: clicked welcome" in welcome
    assert _edge(graph, "welcome/welcome", "welcome/case_study")["label"] == "then: clicked welcome"
    assert _edge(graph, "welcome/welcome", "welcome/welcome_nudge")["label"] == "else: not within 3d"
    assert not [e for e in graph.edges if e[:2] == ("welcome/welcome_nudge", "welcome/webinar_invite")]
    _edge(graph, "welcome/welcome_nudge", "welcome/case_study")
    assert "skipped if event webinar_attended" in graph.nodes["welcome/webinar_invite"]["label"]


def test_a_branch_to_the_end_draws_the_end_and_text_is_escaped() -> None:
    text = (
        PLAYBOOK_PATH.read_text()
        .replace("        else: welcome_nudge\n", "        else: end\n")
        .replace(
            "description: Leads who went cold get two gentle reminders, then silence.",
            'description: "Say \\"bye\\" \\\\ gently"',
        )
    )
    playbook = parse_playbook(text)
    dot = playbook_dot(playbook)
    assert dot == playbook_dot(playbook)  # deterministic
    graph = parse(dot)
    assert _edge(graph, "welcome/welcome", "welcome/end")["label"] == "else: not within 3d"
    assert graph.nodes["welcome/end"]["label"] == "end"
    assert any('Say "bye" \\ gently' in c for c in graph.clusters)
    if shutil.which("dot"):
        checked = subprocess.run(["dot", "-Tcanon"], input=dot, capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(("text", "dot"), [("a", '"a"'), ('say "hi"', '"say \\"hi\\""'), ("a\\nb", '"a\\\\nb"')])
def test_quoting(text: str, dot: str) -> None:
    assert quoted(text) == dot
