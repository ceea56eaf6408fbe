"""Drives a real headless Chromium over the DevTools protocol, for the
black-box tests of the status page (tests/metrics.rs).

    python3 cdp.py URL

Starts `chromium --headless` on a profile of its own, opens URL, then
answers commands on stdin, one per line, with one line on stdout:
`text` -> the page's document.body.innerText as a JSON string;
`quit` -> closes the browser and exits. Errors go to stderr, exit 1.
Needs the `websocket-client` package (PyPI) and Debian's `chromium`.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket  # websocket-client


def browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("cdp.py: no chromium on PATH (apt-get install chromium)")


def main():
    url = sys.argv[1]
    profile = tempfile.mkdtemp(prefix="jobvisor-cdp-")
    proc = subprocess.Popen(
        [browser(), "--headless=new", "--no-sandbox", "--disable-gpu",
         "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
         "--user-data-dir=" + profile, "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 30
        while not os.path.exists(port_file) or os.path.getsize(port_file) == 0:
            if time.time() > deadline or proc.poll() is not None:
                sys.exit("cdp.py: chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port = open(port_file).read().split()[0]
        req = urllib.request.Request(
            "http://127.0.0.1:%s/json/new?%s" % (port, url), method="PUT")
        target = json.load(urllib.request.urlopen(req, timeout=10))
        ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=10)
        next_id = [0]

        def call(method, params=None):
            next_id[0] += 1
            ws.send(json.dumps({"id": next_id[0], "method": method, "params": params or {}}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == next_id[0]:
                    if "error" in msg:
                        raise RuntimeError(msg["error"])
                    return msg["result"]

        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            if cmd == "text":
                r = call("Runtime.evaluate", {
                    "expression": "document.body ? document.body.innerText : ''",
                    "returnByValue": True})
                print(json.dumps(r["result"].get("value", "")), flush=True)
            else:
                print(json.dumps("unknown command " + cmd), flush=True)
        ws.close()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
