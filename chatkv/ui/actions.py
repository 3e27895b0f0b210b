"""The chat screen's actions: config key, action name, footer label and help text, in one
table that the bindings, the footer, the help screen and the command palette share."""

from __future__ import annotations

from textual.keys import format_key

#: (config key under ui.keys, action of ChatScreen, footer label, help text)
ACTIONS: list[tuple[str, str, str, str]] = [
    ("new", "new_conversation", "New", "Start a new conversation"),
    ("conversations", "focus_list", "List", "Jump to the conversation list (Enter opens one)"),
    ("next_conversation", "next_conversation", "Next", "Open the next conversation of the list"),
    ("previous_conversation", "previous_conversation", "Previous", "Open the previous conversation"),
    ("sidebar", "toggle_sidebar", "Sidebar", "Show or hide the conversation list"),
    ("rename", "rename", "Rename", "Rename the open conversation"),
    ("delete", "delete", "Delete", "Delete the open conversation (asks first)"),
    ("stop", "stop", "Stop", "Stop the reply being generated, keeping what it wrote"),
    ("regenerate", "regenerate", "Regenerate", "Generate the last reply again"),
    ("edit", "edit_message", "Edit", "Edit the focused (or last) user message and continue from there"),
    ("system_prompt", "system_prompt", "System", "Edit the conversation's system prompt"),
    ("copy", "copy_message", "Copy", "Copy the focused (or last) message to the clipboard"),
    ("copy_code", "copy_code", "Code", "Copy the last code block of the focused (or last) reply"),
    ("versions", "versions", "Versions", "Earlier versions of the focused (or last) reply: restore one"),
    ("export", "export", "Export", "Export the conversation to a Markdown file in the export directory"),
    (
        "model",
        "switch_model",
        "Model",
        "Switch model… (for the open conversation, from those usable offline; its cache starts anew)",
    ),
    ("theme", "next_theme", "Theme", "Switch to the next theme (remembered)"),
    ("help", "help", "Help", "Show this help"),
]

#: The actions whose first key the footer shows; the rest are in the help (F1) and the palette.
FOOTER_ACTIONS = {
    "new_conversation",
    "focus_list",
    "stop",
    "regenerate",
    "edit_message",
    "copy_message",
    "help",
}


def key_label(keys: str) -> str:
    """'shift+enter,ctrl+j' -> 'shift+enter / ctrl+j' in Textual's key notation."""
    return " / ".join(format_key(k.strip()) for k in keys.split(",") if k.strip())
