"""Voice cloning on a Base checkpoint: save a voice once, then use it by name.

    python examples/voice_clone.py --ref-audio ref.wav --ref-text "What the reference says." --out clone.wav
"""

import argparse
import base64

import httpx
from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", default="http://localhost:8000/v1")
ap.add_argument("--api-key", default="none")
ap.add_argument("--ref-audio", required=True)
ap.add_argument("--ref-text", required=True, help="transcript of the reference audio")
ap.add_argument("--name", default="my-voice")
ap.add_argument("--text", default="This sentence is spoken in the cloned voice.")
ap.add_argument("--out", default="clone.wav")
args = ap.parse_args()

audio = open(args.ref_audio, "rb").read()
headers = {"Authorization": f"Bearer {args.api_key}"}

# 1) save the voice (the clone profile is computed once, then cached and persisted)
created = httpx.post(f"{args.base_url}/audio/voices", headers=headers, timeout=120,
                     data={"name": args.name, "ref_text": args.ref_text},
                     files={"audio_sample": ("ref.wav", audio, "audio/wav")})
if created.status_code not in (201, 409):  # 409: saved by an earlier run
    raise SystemExit(f"could not save the voice: {created.status_code} {created.text}")

client = OpenAI(base_url=args.base_url, api_key=args.api_key)
# 2) use it by name, like any voice
client.audio.speech.create(model="tts-1", voice=args.name, input=args.text, response_format="wav").write_to_file(args.out)
print(f"wrote {args.out}")

# 3) or clone inline, without saving: the reference travels base64-encoded in extra_body
inline = client.audio.speech.create(
    model="tts-1", voice="inline", input=args.text, response_format="wav",
    extra_body={"ref_audio": base64.b64encode(audio).decode(), "ref_text": args.ref_text},
)
inline.write_to_file(args.out.replace(".wav", "_inline.wav"))
