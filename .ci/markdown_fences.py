"""A PyMarkdown rule plugin: a line inside a fenced code block that starts with a fence of the block's own
character and length or longer, but goes on with text, is a fence the author meant to close the block with.

CommonMark does not accept a closing fence followed by text (```` ``` more words ````): the block stays open and
swallows everything up to the next bare fence, headings and commands included, while the file still looks
right in an editor. None of PyMarkdown's own rules reports it. Loaded by .pymarkdown.json
(``plugins.additional_paths``), so ``pymarkdown scan README.md docs`` and tests/test_docs_render.py apply it.
"""
from __future__ import annotations

from typing import Optional, cast

from pymarkdown.plugin_manager.plugin_details import PluginDetailsV2
from pymarkdown.plugin_manager.plugin_scan_context import PluginScanContext
from pymarkdown.plugin_manager.rule_plugin import RulePlugin
from pymarkdown.tokens.fenced_code_block_markdown_token import FencedCodeBlockMarkdownToken
from pymarkdown.tokens.markdown_token import MarkdownToken
from pymarkdown.tokens.text_markdown_token import TextMarkdownToken


class MarkdownFences(RulePlugin):
    """Reports ```` ``` text ```` lines inside an open fenced code block."""

    def __init__(self) -> None:
        super().__init__()
        self._fence: Optional[FencedCodeBlockMarkdownToken] = None

    def get_details(self) -> PluginDetailsV2:
        return PluginDetailsV2(
            plugin_name="fence-followed-by-text",
            plugin_id="VSL001",
            plugin_enabled_by_default=True,
            plugin_description="A fence followed by text does not close a code block: put the text on its own line",
            plugin_version="0.1.0",
        )

    def starting_new_file(self) -> None:
        self._fence = None

    def next_token(self, context: PluginScanContext, token: MarkdownToken) -> None:
        if token.is_fenced_code_block:
            self._fence = cast(FencedCodeBlockMarkdownToken, token)
        elif token.is_fenced_code_block_end:
            self._fence = None
        elif self._fence is not None and token.is_text:
            marker = self._fence.fence_character * self._fence.fence_count
            text = cast(TextMarkdownToken, token)
            for offset, line in enumerate(text.token_text.split("\n")):
                if line.lstrip(" ").startswith(marker) and line.strip().strip(self._fence.fence_character):
                    self.report_next_token_error(
                        context, token, line_number_delta=offset,
                        extra_error_information=f"'{line.strip()}' is code, not the end of the block")
