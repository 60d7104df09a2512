"""``python -m gstream`` for the demo's tests, with a Hub stand-in while the
real ``gstream.hub`` is not on this branch (it is a no-op once it is)."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from tests.hub_standin import install  # noqa: E402

install()

from gstream.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
