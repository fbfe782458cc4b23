"""The Speculator CRD: generated from the operator's pydantic models, structural, kept in
sync with crds/, and refusing what the models refuse."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from structural_schema import apply_defaults, validate, walk

from aurora.cli import main
from aurora.operator import crd
from aurora.operator.spec import ENGINE_RULES, SPEC_RULES, RolloutSpec, SpeculatorSpec
from aurora.runtime.rollout import ROLLOUT_RULES, RolloutPolicy

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = crd.openapi_schema()
SPEC_SCHEMA = SCHEMA["properties"]["spec"]
MINIMAL = {"target": {"model": "smollm2-135m"}}


def _spec(**sections: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL)
    for section, fields in sections.items():
        spec.setdefault(section, {}).update(fields)
    return spec


def test_crds_directory_matches_the_models() -> None:
    # Given the models, when the CRD is rendered, then crds/ holds exactly that text.
    assert crd.crd_drift(ROOT / "crds") is None, "run `aurora crd --output crds`"


def test_check_flag_fails_on_drift_and_passes_after_writing(tmp_path: Path) -> None:
    assert main(["crd", "--output", str(tmp_path), "--check"]) == 1  # missing
    assert main(["crd", "--output", str(tmp_path)]) == 0
    assert main(["crd", "--output", str(tmp_path), "--check"]) == 0
    path = tmp_path / crd.CRD_FILENAME
    path.write_text(path.read_text().replace("minimum: 0", "minimum: 1", 1))
    assert main(["crd", "--output", str(tmp_path), "--check"]) == 1


def test_crd_identity_status_subresource_and_short_name() -> None:
    body = yaml.safe_load(crd.render_crd())
    assert body["metadata"]["name"] == "speculators.aurora.dev"
    names = body["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "Speculator",
        "speculators",
        ["spx"],
    )
    (version,) = body["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    # The scale subresource: `kubectl scale spx/NAME` and autoscalers set the servers.
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.engine.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }


def test_schema_is_structural() -> None:
    # Every node has a type (or is int-or-string / preserve-unknown), no $ref, no
    # keyword a CRD refuses, and properties never sit next to additionalProperties.
    for path, node in walk(SCHEMA):
        assert "$ref" not in node and "$defs" not in node, path
        assert set(node) <= crd.ALLOWED_KEYWORDS | crd.KUBERNETES_EXTENSIONS, (path, set(node))
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path


def test_preserve_unknown_fields_only_on_opaque_kubernetes_structures() -> None:
    opaque = sorted(
        path for path, node in walk(SCHEMA) if node.get("x-kubernetes-preserve-unknown-fields")
    )
    pod_template = [
        "affinity", "envFrom[]", "env[].valueFrom", "tolerations[]", "topologySpreadConstraints[]",
        "volumes[]",
    ]  # fmt: skip
    expected = [
        *(f".spec.engine.{field}" for field in pod_template),
        ".spec.network.extraEgress[]",
        ".spec.network.ingressFrom[]",
        *(f".spec.training.{field}" for field in pod_template if "topology" not in field),
        ".status.rollout",
    ]
    assert opaque == sorted(expected)


def test_api_server_defaults_equal_the_model_defaults() -> None:
    # Given a minimal spec, when the API server applies the CRD's defaults, then the
    # stored object is what the operator's model fills in (modulo empty collections).
    defaulted = apply_defaults(SPEC_SCHEMA, copy.deepcopy(MINIMAL))
    from_model = SpeculatorSpec.model_validate(MINIMAL).to_api()

    def drop_empty(value: Any) -> Any:
        if isinstance(value, dict):
            pruned = {k: drop_empty(v) for k, v in value.items()}
            return {k: v for k, v in pruned.items() if v not in ({}, [])}
        return value

    assert drop_empty(defaulted) == drop_empty(from_model)
    assert validate(SPEC_SCHEMA, defaulted) == []


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, ".target"),
        (_spec(target={"model": ""}), ".target.model"),
        (_spec(engine={"kind": "vllm"}), ".engine.kind"),
        (_spec(engine={"replicas": -1}), ".engine.replicas"),
        (
            _spec(engine={"resources": {"limits": {"memory": "lots"}}}),
            ".engine.resources.limits.memory",
        ),
        (_spec(rollout={"minSpeedup": "fast"}), ".rollout.minSpeedup"),
        (_spec(rollout={"minSpeedup": 1.05}), ".rollout.minSpeedup"),
        (_spec(rollout={"canaryShare": "1.5"}), ".rollout.canaryShare"),
        (_spec(rollout={"onInconclusive": "Pause"}), ".rollout.onInconclusive"),
        (_spec(traces={"sampleRate": "-0.1"}), ".traces.sampleRate"),
        (_spec(traces={"redisUrl": "http://redis:6379"}), ".traces.redisUrl"),
        (_spec(draft={"initial": "relative/path"}), ".draft.initial"),
        (_spec(training={"learningRate": "1e-4x"}), ".training.learningRate"),
        (_spec(storage={"accessMode": "ReadOnlyMany"}), ".storage.accessMode"),
        (_spec(engine={"replica": 2}), ".engine.replica"),
    ],
)
def test_schema_and_model_both_refuse_bad_values(spec: dict[str, Any], field: str) -> None:
    errors = validate(SPEC_SCHEMA, apply_defaults(SPEC_SCHEMA, copy.deepcopy(spec)))
    assert any(error.startswith(field) for error in errors), errors
    with pytest.raises(ValidationError):
        SpeculatorSpec.model_validate(spec)


def test_good_values_pass_both() -> None:
    spec = _spec(
        engine={"kind": "sglang", "replicas": 2, "gpus": 2, "tensorParallel": 2,
                "resources": {"requests": {"cpu": 4, "memory": "32Gi"}}},
        draft={"initial": "/models/eagle3"},
        rollout={"minSpeedup": "1.10", "canaryShare": "0.25", "baselineShare": "0.05"},
        training={"learningRate": "3e-5"},
        storage={"size": "50Gi", "accessMode": "ReadWriteMany"},
    )  # fmt: skip
    assert validate(SPEC_SCHEMA, apply_defaults(SPEC_SCHEMA, copy.deepcopy(spec))) == []
    assert SpeculatorSpec.model_validate(spec).engine.num_draft_tokens == 5
    # day 0 on SGLang by default: suffix, which SGLang serves with its NGRAM speculator
    default = _spec(engine={"kind": "sglang", "replicas": 2, "gpus": 1})
    assert validate(SPEC_SCHEMA, apply_defaults(SPEC_SCHEMA, copy.deepcopy(default))) == []
    assert SpeculatorSpec.model_validate(default).draft.initial == "suffix"
    # and without a draft: it serves plainly until a learned draft is promoted
    scratch = _spec(
        engine={"kind": "sglang", "replicas": 2, "gpus": 1}, draft={"initial": "scratch"}
    )
    assert validate(SPEC_SCHEMA, apply_defaults(SPEC_SCHEMA, copy.deepcopy(scratch))) == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec(engine={"kind": "sglang", "replicas": 2}, draft={"initial": "ngram"}), "set engine.gpus"),
        (_spec(engine={"kind": "sglang", "gpus": 1}, draft={"initial": "ngram"}), "replicas to 2 or more"),
        (_spec(engine={"tensorParallel": 2, "gpus": 2}), "tensorParallel to 1"),
        (_spec(engine={"kind": "sglang", "replicas": 2, "gpus": 1, "tensorParallel": 2},
               draft={"initial": "ngram"}), "cannot exceed engine.gpus"),
        (_spec(engine={"speculativeSteps": 2, "speculativeNumDraftTokens": 8}), "at most"),
        (_spec(rollout={"canaryShare": "0.6", "baselineShare": "0.4"}), "must be below 1"),
        (_spec(rollout={"canaryShare": "0"}), "above 0 and below 1"),
        (_spec(rollout={"minSpeedup": "0.9", "regressionThreshold": "0.8"}), "at least 1.0"),
        (_spec(rollout={"minSpeedup": "1.05", "regressionThreshold": "1.1"}), "must not exceed"),
        (_spec(rollout={"falsePromotionRate": "0.5"}), "above 0 and below 0.5"),
        (_spec(rollout={"falsePromotionRate": "0"}), "above 0 and below 0.5"),
        (_spec(rollout={"minSamples": 5}), "minSamples must be at least 10"),
        (_spec(rollout={"minSamples": 50, "maxCanarySamples": 20}), "at least rollout.minSamples"),
    ],
)  # fmt: skip
def test_cross_field_rules_refuse_with_the_crd_message(spec: dict[str, Any], message: str) -> None:
    # The same Rule objects produce the CEL rule and the Python check: the model's error
    # carries the message the API server would print.
    with pytest.raises(ValidationError) as error:
        SpeculatorSpec.model_validate(spec)
    assert message in str(error.value)
    cel_messages = [
        rule["message"]
        for _, node in walk(SCHEMA)
        for rule in node.get("x-kubernetes-validations", [])
    ]
    assert any(message in text for text in cel_messages)


def test_every_rule_is_in_the_crd_with_its_cel() -> None:
    cel = {
        rule["rule"]
        for _, node in walk(SCHEMA)
        for rule in node.get("x-kubernetes-validations", [])
    }
    for rule in (*ENGINE_RULES, *ROLLOUT_RULES, *SPEC_RULES):
        assert rule.cel in cel
    assert any("self.metadata.name.size()" in text for text in cel)


def test_spec_rollout_is_the_rollout_policy_with_its_defaults() -> None:
    # One model: the CRD's spec.rollout carries the policy's own fields and defaults.
    spec = RolloutSpec()
    assert isinstance(spec, RolloutPolicy)
    assert spec.model_dump(exclude={"enabled", "interval_seconds"}) == RolloutPolicy().model_dump()
    rollout = SPEC_SCHEMA["properties"]["rollout"]
    policy = RolloutPolicy().model_dump(mode="json", by_alias=True)
    for field in ("minSpeedup", "regressionThreshold", "minSamples", "canaryShare"):
        assert rollout["properties"][field]["default"] == policy[field]
    assert rollout["default"]["minSpeedup"] == "1.05"


def test_an_sglang_speculator_never_canaries_a_hybrid() -> None:
    # An SGLang process serves one speculative algorithm: no suffix tree beside a head.
    torch = SpeculatorSpec.model_validate(_spec())
    assert torch.rollout_policy().hybrid_canaries is True
    spec = SpeculatorSpec.model_validate(_spec(engine={"kind": "sglang", "replicas": 2, "gpus": 1}))
    assert spec.rollout.hybrid_canaries is True  # as written
    assert spec.rollout_policy().hybrid_canaries is False  # as the policy runs it
    assert spec.rollout_policy().min_speedup == spec.rollout.min_speedup


def test_printer_columns_point_at_schema_fields() -> None:
    paths = {path for path, _ in walk(SCHEMA)}
    for column in crd.PRINTER_COLUMNS:
        json_path = column["jsonPath"].split("[?")[0]
        if json_path != ".metadata.creationTimestamp":
            assert json_path in paths, column
    names = [column["name"] for column in crd.PRINTER_COLUMNS if not column.get("priority")]
    assert names == ["Ready", "Engine", "Active", "Accept", "Speedup", "Age"]
