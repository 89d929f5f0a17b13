"""The `--tool-call-parser` parsers (tool_choice "auto"), one file per format family:
each reads the calls out of a reply in the model's own format (`parse`: content and
calls; a reply whose calls do not parse is all content), says how much of a partial
reply is surely content (`content_prefix`) and which calls it has written so far
(`partial`: each name once complete, the arguments' text so far) for the stream.
base.py holds what they share; tool_calls.py the request-level functions."""

from __future__ import annotations

from loraplex.entrypoints.tool_parsers.base import _ToolParser
from loraplex.entrypoints.tool_parsers.deepseek import DeepSeekV3Parser, DeepSeekV31Parser
from loraplex.entrypoints.tool_parsers.glm45 import Glm45Parser
from loraplex.entrypoints.tool_parsers.gpt_oss import OpenAIParser
from loraplex.entrypoints.tool_parsers.granite import GraniteParser
from loraplex.entrypoints.tool_parsers.hermes import HermesParser
from loraplex.entrypoints.tool_parsers.kimi_k2 import KimiK2Parser
from loraplex.entrypoints.tool_parsers.llama import Llama3JsonParser
from loraplex.entrypoints.tool_parsers.minimax_m2 import MiniMaxM2Parser
from loraplex.entrypoints.tool_parsers.mistral import MistralParser
from loraplex.entrypoints.tool_parsers.phi4_mini import Phi4MiniJsonParser
from loraplex.entrypoints.tool_parsers.pythonic import Llama4PythonicParser, PythonicParser
from loraplex.entrypoints.tool_parsers.qwen3_coder import Qwen3CoderParser
from loraplex.entrypoints.tool_parsers.seed_oss import SeedOssParser

PARSERS: dict[str, type[_ToolParser]] = {
    "hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser,
    "pythonic": PythonicParser, "llama4_pythonic": Llama4PythonicParser,
    "qwen3_coder": Qwen3CoderParser, "openai": OpenAIParser, "granite": GraniteParser,
    "phi4_mini_json": Phi4MiniJsonParser, "glm45": Glm45Parser,
    "deepseek_v3": DeepSeekV3Parser, "deepseek_v31": DeepSeekV31Parser,
    "kimi_k2": KimiK2Parser, "minimax_m2": MiniMaxM2Parser, "seed_oss": SeedOssParser}

__all__ = ["PARSERS", "DeepSeekV3Parser", "DeepSeekV31Parser", "Glm45Parser", "GraniteParser",
           "HermesParser", "KimiK2Parser", "Llama3JsonParser", "Llama4PythonicParser",
           "MiniMaxM2Parser", "MistralParser", "OpenAIParser", "Phi4MiniJsonParser",
           "PythonicParser", "Qwen3CoderParser", "SeedOssParser"]
