"""Test support shipped with the app's package (installed beside `app`, never imported by it): vLLM plugins that
the multi-node tests load through entry points in every engine process."""
