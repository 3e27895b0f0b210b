"""The chat screen's model switch: the picker dialog, the load in a worker, and what the
user is told. A mixin of ChatScreen, kept apart so the screen module holds the flow of a turn.

While the new model loads the screen is in its launch state ("loading NAME…"): the input
stays usable, and a message sent meanwhile waits for the load like one sent at launch."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from textual import work

from chatkv.ui.dialogs import ModelPickerScreen
from chatkv.ui.turns import ModelLoaded, ModelSwitched

if TYPE_CHECKING:
    from chatkv.ui.chat_screen import ChatScreen


class ModelActions:
    """Actions of ChatScreen (`self` is the screen) that change the model."""

    def model_ready(self: ChatScreen) -> bool:
        """Whether a turn may start now: loaded, and no load or switch under way (a switch
        drops the old model only once its worker runs)."""
        return self.backend.ready and self.model_state != "loading"

    def action_switch_model(self: ChatScreen) -> None:
        if self.model_state == "loading":
            self.nothing(f"{self.status.model} is still loading; switch models when it is ready.")
            return
        if self.busy("switch models"):
            return
        try:
            models = self.backend.models()
        except Exception as exc:
            self.report(exc, "list the models")
            return
        current = self.backend.model_name

        def done(name: str | None) -> None:
            self.prompt.focus()
            if name is None:
                return
            if name == current and self.backend.ready:
                self.nothing(f"Already using {name}.")
                return
            if self.busy("switch models"):
                return
            self.start_switch(name, self.conversation_id)

        self.app.push_screen(ModelPickerScreen(models, current), done)

    def start_switch(self: ChatScreen, name: str, conversation_id: int | None) -> None:
        """Show "loading NAME…" and switch in a worker; `on_model_switched` tells the outcome."""
        self.model_state = "loading"
        self._wait_started = time.monotonic()
        self.status.show(model=name, model_state="loading", activity="")
        self.refresh_bindings()
        self.switch_model_worker(name, conversation_id)

    @work(thread=True, exclusive=True, group="load")
    def switch_model_worker(self: ChatScreen, name: str, conversation_id: int | None) -> None:
        try:
            self.backend.switch_model(name, conversation_id)
        except Exception as exc:  # reported in the UI, never raised into Textual
            self.post_message(ModelSwitched(name, conversation_id, exc))
        else:
            self.post_message(ModelSwitched(name, conversation_id, None))

    async def on_model_switched(self: ChatScreen, event: ModelSwitched) -> None:
        from chatkv.ui.chat_screen import error_text

        self.status.show(model=self.backend.model_name)
        if event.error is None:
            if event.conversation_id is not None:
                self.notify(
                    f"Switched to {event.name}; this conversation's cache starts anew "
                    "(the new model recomputes its history on the next turn)",
                    title="Model",
                    timeout=10,
                )
            else:
                self.notify(f"Switched to {event.name}.", title="Model", timeout=6)
            if event.conversation_id is not None and event.conversation_id == self.conversation_id:
                self.sync_messages()  # the status bar's cache label
            self.refresh_list()
            # Ready now, as at launch: a message sent while it loaded goes to the new model.
            await self.on_model_loaded(ModelLoaded(None))
            return
        kept = self.backend.ready
        if kept:
            still = f"; still using {self.backend.model_name}"
        else:
            still = f"; {self.backend.model_name} could not be loaded again either (sending retries it)"
        self.notify(
            f"Could not switch to {event.name}: {error_text(event.error)}{still}",
            title="Model",
            severity="error",
            timeout=10,
        )
        if kept:
            # A message sent while it loaded was meant for the new model: give it back.
            self.model_state = "ready"
            self.status.show(model_state="ready", activity="", device=self.backend.device)
            await self.give_back_pending()
            self.update_context()
            self.refresh_bindings()
        else:  # the previous model could not be loaded again either: as after a failed launch
            self.model_state = "failed"
            self.status.show(model_state="failed", activity="")
            await self.give_back_pending()
            self.refresh_bindings()

    async def give_back_pending(self: ChatScreen) -> None:
        """Remove the message waiting for the model and put its text back in the input."""
        if self.pending is not None:
            widget, text = self.pending
            self.pending = None
            await widget.remove()
            self.restore_input(text)
