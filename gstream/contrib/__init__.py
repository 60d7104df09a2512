"""Framework integrations. Each module imports its framework lazily-at-import:
import ``gstream.contrib.flask`` only where Flask is installed, and so on."""
