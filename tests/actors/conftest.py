"""Every Ray these tests start: a private temp directory, token authentication, every raylet on the loopback
address. Set here, before any test module imports Ray (which reads them then), so that any file or selection of
files runs alike; a module that set them itself had them only when it happened to be collected first."""
import os
import secrets
import tempfile

os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="moeserve-test-ray-"))
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
