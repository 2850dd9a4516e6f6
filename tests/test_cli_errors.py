"""CLI errors: a model that cannot be loaded and a malformed flag end in one line naming the model or the flag and
what is accepted, never a traceback. No network and no real model needed."""

import re

import pytest

from kvevict.cli import main

EMBEDDED_NAMES = "smollm2-135m, gemma3-270m"


def one_line_exit(argv, match):
    with pytest.raises(SystemExit, match=match) as err:
        main(argv)
    assert isinstance(err.value.code, str) and "\n" not in err.value.code.strip()
    return err.value.code


def test_mistyped_embedded_name_suggests_the_right_one():
    one_line_exit(["generate", "--model", "smollm2-135", "--prompt", "hi"],
                  rf"^kvevict generate: error: unknown model 'smollm2-135' \(did you mean 'smollm2-135m'\?\).*"
                  rf"{EMBEDDED_NAMES}")


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["demo"]])
def test_hub_id_that_cannot_be_fetched_is_one_line(command, monkeypatch):
    # offline, as on a machine without network: transformers answers at once with an OSError
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    one_line_exit([*command[:1], "--model", "kvevict-tests/no-such-model", *command[1:]],
                  rf"^kvevict {command[0]}: error: cannot load model 'kvevict-tests/no-such-model' .*"
                  rf"embedded names: {EMBEDDED_NAMES}")


def test_folder_without_a_model_is_one_line(tmp_path):
    one_line_exit(["generate", "--model", str(tmp_path), "--prompt", "hi"],
                  rf"^kvevict generate: error: model directory {re.escape(str(tmp_path))} has no config.json")


@pytest.mark.parametrize("text, problem", [
    ("not json", "is not valid JSON"),
    ("{'window': 4}", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('"window"', "must be a JSON object"),
])
@pytest.mark.parametrize("command", ["generate", "profile", "eval"])
def test_policy_args_that_are_not_a_json_object_name_the_flag(command, text, problem, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kvevict.models.load_model", no_load)
    argv = {"generate": ["generate", "--model", "smollm2-135m", "--prompt", "hi"],
            "profile": ["profile", "--model", "smollm2-135m"], "eval": ["eval", "--model", "smollm2-135m"]}[command]
    one_line_exit([*argv, "--policy-args", text],
                  rf"^kvevict {command}: error: --policy-args {problem}.*e\.g\. '{{\"window\": 64}}'")


def test_policy_args_still_reach_the_policy(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kvevict.models.load_model", no_load)
    # a valid object goes through to the policy, whose own check names the parameter
    one_line_exit(["generate", "--model", "smollm2-135m", "--prompt", "hi", "--policy", "snapkv",
                   "--policy-args", '{"window": 2.5}'], "^kvevict generate: error: window must be a whole number")
