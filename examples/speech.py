"""Plain OpenAI SDK call: text to a WAV file.

    python examples/speech.py --text "Hello from Qwen3-TTS." --voice alloy --out hello.wav
"""

import argparse

from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", default="http://localhost:8000/v1")
ap.add_argument("--api-key", default="none")
ap.add_argument("--text", default="Hello! This is Qwen3-TTS served through vLLM.")
ap.add_argument("--voice", default="alloy", help="OpenAI voice name or a CustomVoice speaker (ryan, vivian, ...)")
ap.add_argument("--out", default="speech.wav")
args = ap.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.api_key)
response = client.audio.speech.create(
    model="tts-1",  # OpenAI model names are accepted as aliases of the served checkpoint
    voice=args.voice,
    input=args.text,
    response_format="wav",
    extra_body={"language": "English"},  # Qwen3-TTS extras travel in extra_body
)
response.write_to_file(args.out)
print(f"wrote {args.out}")
