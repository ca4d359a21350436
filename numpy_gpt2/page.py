"""The page `serve` answers GET / with: type a prompt, set temperature and length, and watch the
tokens stream in from /v1/completions. One self-contained document: no build step, nothing
fetched from another host."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>numpy-gpt2</title>
<style>
body { font-family: sans-serif; max-width: 50em; margin: 2em auto; padding: 0 1em; }
textarea { width: 100%; height: 6em; font: inherit; }
#output { white-space: pre-wrap; border: 1px solid #ccc; padding: 0.5em; min-height: 6em; }
#output .prompt { color: #666; }
label { margin-right: 1em; }
</style>
</head>
<body>
<h1>numpy-gpt2</h1>
<textarea id="prompt" placeholder="Type a prompt">Once upon a time</textarea>
<p>
<label>Temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
<label>Tokens <input id="max_tokens" type="number" min="1" max="1024" value="64"></label>
<label>API key <input id="key" type="password" placeholder="if the server has one"></label>
<button id="go">Generate</button> <button id="halt" disabled>Stop</button>
</p>
<div id="output"></div>
<p id="status"></p>
<script>
const $ = (id) => document.getElementById(id);
let controller = null;

async function generate() {
  const output = $("output"), status = $("status");
  output.textContent = "";
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = $("prompt").value;
  const text = document.createElement("span");
  text.id = "completion";
  output.append(prompt, text);
  status.textContent = "generating";
  controller = new AbortController();
  $("go").disabled = true; $("halt").disabled = false;
  const headers = {"Content-Type": "application/json"};
  if ($("key").value) headers["Authorization"] = "Bearer " + $("key").value;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers, signal: controller.signal,
      body: JSON.stringify({prompt: $("prompt").value, stream: true,
                            temperature: Number($("temperature").value),
                            max_tokens: Number($("max_tokens").value)})});
    if (!response.ok) {
      const body = await response.json();
      status.textContent = "error: " + body.error.message;
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") { status.textContent = "done"; continue; }
        const event = JSON.parse(data);
        if (event.error) { status.textContent = "error: " + event.error.message; continue; }
        text.textContent += event.choices[0].text;
        if (event.choices[0].finish_reason) status.textContent = "finished: " + event.choices[0].finish_reason;
      }
    }
  } catch (error) {
    status.textContent = controller.signal.aborted ? "stopped" : "error: " + error;
  } finally {
    $("go").disabled = false; $("halt").disabled = true;
  }
}

$("go").addEventListener("click", generate);
$("halt").addEventListener("click", () => controller && controller.abort());
</script>
</body>
</html>
"""
