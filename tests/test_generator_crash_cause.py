"""The cause of a vLLM death read from its log (generator/crash_cause.py), on lines vLLM 0.32 wrote when the
unload race of issue 18 killed it (trimmed; paths shortened)."""

from __future__ import annotations

from generator.crash_cause import crash_cause

W = "(Worker pid=2451) ERROR 12-07 09:45:06 [multiproc_executor.py:1063] "
E = "(EngineCore pid=2439) ERROR 12-07 09:45:06 [core.py:1512] "
A = "(APIServer pid=2427) ERROR 12-07 09:45:06 [async_llm.py:906] "
SP = "/venv/lib/python3.11/site-packages/"
CRASH = "\n".join([
    "(APIServer pid=2427) INFO 12-07 09:43:45 [serving.py:332] Resolved and loaded LoRA adapter 'policy-v1'",
    W + "Traceback (most recent call last):",
    W + f'  File "{SP}vllm/lora/model_manager.py", line 442, in _set_adapter_mapping',
    W + "    punica_wrapper.update_metadata(",
    W + f'  File "{SP}vllm/lora/punica_wrapper/utils.py", line 100, in convert_mapping',
    W + "    prompt_mapping: list[int] = [",
    W + f'  File "{SP}vllm/lora/punica_wrapper/utils.py", line 101, in <listcomp>',
    W + "    lora_id_to_index[x] if x > 0 else -1 for x in mapping.prompt_mapping",
    W + "    ~~~~~~~~~~~~~~~~^^^",
    W + "KeyError: np.int64(2)",
    E + "Traceback (most recent call last):",
    E + f'  File "{SP}vllm/v1/engine/core.py", line 1505, in run_engine_core',
    E + "    raise RuntimeError(",
    E + "RuntimeError: Worker failed with error 'np.int64(2)', please check the stack trace above for the root cause",
    A + "AsyncLLM output_handler failed.",
    A + "Traceback (most recent call last):",
    A + f'  File "{SP}vllm/v1/engine/core_client.py", line 1235, in get_output_async',
    A + "    raise self._format_exception(outputs) from None",
    A + "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the "
        "root cause.",
    'INFO:     127.0.0.1:40584 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error',
])


def test_the_worker_exception_is_the_cause_not_the_wrappers():
    cause = crash_cause(CRASH)
    assert (cause.kind, cause.message) == ("KeyError", "np.int64(2)")
    assert cause.where == "vllm/lora/punica_wrapper/utils.py:100 in convert_mapping"
    assert str(cause) == "KeyError: np.int64(2) at vllm/lora/punica_wrapper/utils.py:100 in convert_mapping"


def test_only_wrappers_or_nothing_is_a_kill():
    assert crash_cause("\n".join(CRASH.splitlines()[10:])).kind == "killed", "the wrappers name no cause"
    assert crash_cause("INFO: started\nINFO: Shutting down").kind == "killed"


def test_an_engine_core_error_of_its_own_is_the_cause():
    own = [E + "Traceback (most recent call last):", E + f'  File "{SP}vllm/lora/model_manager.py", line 362, '
           "in activate_adapter", E + "ValueError: No free lora slots"]
    cause = crash_cause("\n".join(CRASH.splitlines()[:1] + own + CRASH.splitlines()[14:]))
    assert str(cause) == "ValueError: No free lora slots at vllm/lora/model_manager.py:362 in activate_adapter"
