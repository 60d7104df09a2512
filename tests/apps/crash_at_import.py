"""An application module that fails to import (for the workers' crash-loop test)."""

raise RuntimeError("boom at import")
