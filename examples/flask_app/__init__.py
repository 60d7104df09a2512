"""A Flask app with blocking views beside SSE and WebSocket endpoints."""
