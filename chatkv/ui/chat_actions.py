"""The chat screen's conversation-level actions that open a dialog or write somewhere:
rename, delete, system prompt, copy, export, theme, help. A mixin of ChatScreen, kept
apart so the screen module holds the flow of a turn."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from chatkv.ui.dialogs import ConfirmScreen, HelpScreen, TextPromptScreen, VersionsScreen
from chatkv.ui.export import export_dir, write_export
from chatkv.ui.widgets import ChatMessage

if TYPE_CHECKING:
    from chatkv.api import ConversationSummary
    from chatkv.ui.chat_screen import ChatScreen

CODE_BLOCK = re.compile(r"^(`{3,}|~{3,})[^\n]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)


def code_blocks(markdown: str) -> list[str]:
    """The fenced code blocks of a Markdown text, in order, without their fences."""
    return [m.group(2) for m in CODE_BLOCK.finditer(markdown)]


class ConversationActions:
    """Actions of ChatScreen (`self` is the screen) that act on the open conversation."""

    def _saved(self: ChatScreen, cid: int, what: str) -> ConversationSummary | None:
        """The open conversation as saved, or None after saying why (deleted meanwhile by
        another process: the list is refreshed)."""
        try:
            return self.backend.get_conversation(cid)
        except Exception as exc:
            self.report(exc, what)
            self.refresh_list()
            return None

    def action_rename(self: ChatScreen) -> None:
        cid = self.conversation_id
        if cid is None:
            self.nothing("This conversation is not saved yet; it is named after its first message.")
            return
        conv = self._saved(cid, "rename the conversation")
        if conv is None:
            return
        title = conv.title

        def done(new: str | None) -> None:
            self.prompt.focus()
            if new is None or not new.strip() or new.strip() == title:
                return
            try:
                self.backend.rename(cid, new.strip())
            except Exception as exc:
                self.report(exc, "rename the conversation")
                return
            if cid == self.conversation_id:
                self.sub_title = new.strip()
            self.refresh_list()

        self.app.push_screen(TextPromptScreen("Rename conversation", title), done)

    async def action_delete(self: ChatScreen) -> None:
        cid = self.conversation_id
        if cid is None:
            if self.busy("discard this draft"):
                return
            self.nothing("This conversation is not saved yet; there is nothing to delete.")
            return
        if self.busy("delete this conversation"):
            return
        conv = self._saved(cid, "delete the conversation")
        if conv is None:
            return
        title = conv.title

        async def done(confirmed: bool | None) -> None:
            self.prompt.focus()
            if not confirmed:
                return
            self.status.show(turn="deleting…")
            try:  # off the UI thread: it waits for queued cache writes, and may reach a bucket
                await asyncio.to_thread(self.backend.delete, cid)
            except Exception as exc:
                self.report(exc, "delete the conversation")
                self.status.show(turn="")
                return
            self.notify(f"Deleted “{title}”.")
            await self.open_conversation(None)

        self.app.push_screen(ConfirmScreen(f"Delete “{title}” and its cache?", "Delete"), done)

    async def action_system_prompt(self: ChatScreen) -> None:
        if self.busy("change the system prompt"):
            return
        cid = self.conversation_id
        if cid is None:
            current = self.draft_system_prompt
        else:
            conv = self._saved(cid, "change the system prompt")
            if conv is None:
                return
            current = conv.system_prompt
        default = getattr(self.backend, "default_system_prompt", "") or ""
        if default:
            note = f"Empty means the model's own default: “{default}”"
        else:
            note = "Empty means the model's own default, if it has one."

        async def done(text: str | None) -> None:
            self.prompt.focus()
            if text is None or text == current:
                return
            if cid is None:  # a draft keeps it until its first message creates the conversation
                self.draft_system_prompt = text
            else:
                try:
                    self.backend.set_system_prompt(cid, text)
                except Exception as exc:
                    self.report(exc, "set the system prompt")
                    return
            self.update_context()
            self.notify("System prompt saved.")

        self.app.push_screen(TextPromptScreen("System prompt", current, multiline=True, note=note), done)

    def action_copy_message(self: ChatScreen) -> None:
        target = self.target_message(None)
        if not isinstance(self.focused, ChatMessage):
            target = self.target_message("assistant") or target
        if target is None or not target.content:
            self.nothing("No message to copy yet.")
            return
        self.app.copy_to_clipboard(target.content)
        self.notify(f"Copied {len(target.content):,} characters.")

    def action_copy_code(self: ChatScreen) -> None:
        focused = self.focused
        candidates = [focused] if isinstance(focused, ChatMessage) else []
        candidates += [w for w in reversed(self.log_view.messages) if w.role == "assistant"]
        for widget in candidates:
            blocks = code_blocks(widget.content)
            if blocks:
                self.app.copy_to_clipboard(blocks[-1])
                lines = blocks[-1].count("\n") or 1
                self.notify(f"Copied a code block ({lines:,} line{'s' if lines != 1 else ''}).")
                return
        self.nothing("No code block to copy in this conversation.")

    def action_export(self: ChatScreen) -> None:
        cid = self.conversation_id
        if cid is None:
            self.nothing("Nothing to export yet; send a message first.")
            return
        try:
            conv = self.backend.get_conversation(cid)
            text = self.backend.export(cid, "md")
            path = write_export(export_dir(self.settings), conv.title, cid, text)
        except Exception as exc:
            self.report(exc, "export the conversation")
            return
        self.notify(f"Exported to {path}", title="Export", timeout=8)

    def action_next_theme(self: ChatScreen) -> None:
        self.chat_app.next_theme()

    def action_help(self: ChatScreen) -> None:
        self.app.push_screen(HelpScreen(self.settings))

    async def action_versions(self: ChatScreen) -> None:
        if self.busy("restore an earlier version"):
            return
        focused = self.focused
        target = focused if isinstance(focused, ChatMessage) else self.target_message("assistant")
        if self.conversation_id is None or target is None or target.message is None:
            self.nothing("No saved reply with earlier versions yet.")
            return
        lister = getattr(self.backend, "versions", None)
        if lister is None:
            self.nothing("This backend keeps no earlier versions.")
            return
        message, cid = target.message, self.conversation_id
        try:
            versions = lister(message.id)
        except Exception as exc:
            self.report(exc, "list the earlier versions")
            return
        if not versions:
            self.nothing("This message has no earlier versions; regenerate (or edit) keeps them.")
            return

        async def done(version_id: int | None) -> None:
            self.prompt.focus()
            if version_id is None:
                return
            try:
                self.backend.restore(message.id, version_id)
            except Exception as exc:
                self.report(exc, "restore the version")
                return
            await self.open_conversation(cid)
            self.notify("Restored an earlier version.")

        self.app.push_screen(VersionsScreen(message.content, versions), done)
