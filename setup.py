"""Package metadata for gstream (tool settings live in pyproject.toml)."""

from pathlib import Path

from setuptools import find_packages, setup

TEST = [
    "pytest>=7",
    "pytest-timeout>=2",
    "hypothesis>=6",
    "requests>=2.28",
    "httpx>=0.24",
    "websocket-client>=1.5",
    "ruff>=0.4",
    "mypy>=1.5",
    # docs/topics.md's JWT example runs in tests/test_topics.py (not a gstream dependency).
    "PyJWT>=2.8",
]

setup(
    name="gstream",
    version="0.1.0",
    description="Server-Sent Events and WebSockets for gevent/greenlet WSGI servers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["gstream", "gstream.*"]),
    package_data={"gstream": ["py.typed", "demo/static/*"]},
    install_requires=[
        "gevent>=22.10",
        "greenlet>=2.0",
        "websockets>=13",
    ],
    extras_require={
        "test": TEST,
        "redis": ["redis>=4.5", "hiredis>=2"],
        "locust": ["locust>=2.20"],
        "flask": ["flask>=2.2"],
        "django": ["django>=4.2"],
        # gunicorn's gevent worker imports packaging without declaring it,
        # and (from gunicorn 24) refuses a gevent older than 24.10.1.
        # scripts/check_extras.sh installs each extra alone to catch this.
        "gunicorn": ["gunicorn>=21", "packaging", "gevent>=24.10.1"],
        "browser": ["playwright>=1.40"],
        "demo": [],
        # The API reference (docs/api/, built by scripts/docs.sh).
        "docs": ["sphinx>=7"],
        "bench": [
            "gevent-websocket>=0.10",
            "flask>=2.2",
            "flask-sock>=0.7",
            "sse-starlette>=2",
            "uvicorn>=0.30",
            "matplotlib>=3.5",
            # The profiler of docs/performance.md (attach: py-spy record -p PID).
            "py-spy>=0.3",
        ],
    },
    entry_points={"console_scripts": ["gstream=gstream.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Flask",
        "Framework :: Django",
        "Topic :: Internet :: WWW/HTTP :: WSGI",
    ],
)
