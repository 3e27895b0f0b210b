"""chatkv's Textual front end. `create_app(backend, settings)` builds it."""

from chatkv.ui.app import ChatKVApp, create_app

__all__ = ["ChatKVApp", "create_app"]
