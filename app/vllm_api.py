"""The few vLLM internals this app uses, imported in one place.

The engine replica runs vLLM's own OpenAI server application (the FastAPI app that `vllm serve`
builds) in-process, so request handling matches `vllm serve` exactly. Module paths moved between
vLLM releases: this app runs on the CPU build 0.32 and the CUDA build 0.26 (the GPU device image).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

try:  # vLLM >= 0.30: the supported home of the OpenAI server's parts
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client_from_engine_args
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # vLLM 0.26 (the GPU image) has no `launchers`: these are defined, not deprecated, there
    from vllm.entrypoints.openai.api_server import (  # type: ignore[no-redef]
        build_app,  # noqa: F401  (used as vllm_api.build_app, like the names above)
        build_async_engine_client_from_engine_args,  # noqa: F401
        init_app_state,  # noqa: F401
    )
    from vllm.entrypoints.openai.cli_args import make_arg_parser  # type: ignore[no-redef]

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser


def server_args(model: str, served_name: str, overrides: dict[str, Any],
                lora_modules: dict[str, str] | None = None) -> argparse.Namespace:
    """The argument namespace `vllm serve <model> [--lora-modules ...]` would build, with `overrides` applied by
    vLLM name. `lora_modules`: adapter name -> path, loaded by vLLM at start and listed with this model as parent."""
    parser = make_arg_parser(FlexibleArgumentParser())
    adapters = [json.dumps({"name": name, "path": path}) for name, path in (lora_modules or {}).items()]
    args = parser.parse_args(["--model", model, *(["--lora-modules", *adapters] if adapters else [])])
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise ValueError(f"unknown vLLM engine argument(s) {unknown}; use the names of `vllm serve --help`")
    for key, value in overrides.items():
        setattr(args, key, value)
    args.served_model_name = [served_name]
    return args


def known_argument_names() -> set[str]:
    """Every name `engine_args` may use: engine arguments plus OpenAI-server (frontend) arguments."""
    parser = make_arg_parser(FlexibleArgumentParser())
    return {a.dest for a in parser._actions} | {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def engine_args_from(args: argparse.Namespace) -> AsyncEngineArgs:
    return AsyncEngineArgs.from_cli_args(args)


def fail_in_flight(engine: Any, reason: str) -> None:
    """Ends every request the engine (vLLM's AsyncLLM) is working on with vLLM's EngineDeadError, the error its own
    output handler raises into them when the engine core dies (same path in 0.26 and 0.32)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    engine.output_processor.propagate_error(EngineDeadError(reason))
