"""One question to the local server through the OpenAI Python SDK."""

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:1234/v1", api_key="lm-studio")
question = "What is the capital of France? Answer in one sentence."
print(f"Q: {question}")
stream = client.chat.completions.create(
    model="smollm2-135m-instruct",
    messages=[{"role": "user", "content": question}],
    stream=True,
)
print("A: ", end="", flush=True)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
