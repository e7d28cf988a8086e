"""Saved voices: list them, save one from reference audio (Base checkpoints clone; others answer
404), delete one. Each voice belongs to the API key that saved it.

    python examples/voices.py list
    python examples/voices.py create --name narrator --audio ref.wav --ref-text "What the reference says."
    python examples/voices.py create --name narrator --audio ref.wav   # no transcript: speaker embedding only
    python examples/voices.py delete --name narrator
"""

import argparse
import json
from pathlib import Path

import httpx

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", default="http://localhost:8000/v1")
ap.add_argument("--api-key", default="none")
sub = ap.add_subparsers(dest="action", required=True)
sub.add_parser("list", help="the built-in speakers and this key's saved voices")
create = sub.add_parser("create", help="save a voice cloned from reference audio")
create.add_argument("--name", required=True)
create.add_argument("--audio", required=True, help="reference audio file (wav, mp3, flac, ...)")
create.add_argument("--ref-text", help="its transcript (in-context cloning)")
create.add_argument("--description")
delete = sub.add_parser("delete", help="delete a saved voice")
delete.add_argument("--name", required=True)
args = ap.parse_args()

voices = f"{args.base_url}/audio/voices"
headers = {"Authorization": f"Bearer {args.api_key}"}
if args.action == "list":
    r = httpx.get(voices, headers=headers, timeout=30)
elif args.action == "create":
    form = {"name": args.name, **({"ref_text": args.ref_text} if args.ref_text else {}),
            **({"description": args.description} if args.description else {})}
    with open(args.audio, "rb") as audio:
        r = httpx.post(voices, headers=headers, data=form, files={"audio_sample": (Path(args.audio).name, audio)},
                       timeout=120)
else:
    r = httpx.delete(f"{voices}/{args.name}", headers=headers, timeout=30)
if r.status_code >= 400:  # the body says why: {"error": {"message", "type", "param", "code"}}
    raise SystemExit(f"{args.action} failed: HTTP {r.status_code} {r.text}")
print(json.dumps(r.json(), indent=2))
