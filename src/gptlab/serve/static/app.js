// The chat page: keeps the conversation, streams answers from /v1/chat/completions.
// Model text is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let messages = [];
let modelName = null;
let controller = null;

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) throw new Error((await r.json()).error.message);
  modelName = (await r.json()).data[0].id;
  $("model").textContent = modelName;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Reads server-sent events ("data: {...}\n\n") from the response body as they arrive.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  const convo = messages;  // "New chat" during an answer starts a fresh list; this one ends here
  convo.push({ role: "user", content: text });
  addTurn("user", text);
  const out = addTurn("assistant", "");
  controller = new AbortController();
  busy(true);
  let answer = "";
  try {
    if (!modelName) await loadModel();
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: modelName, messages: convo, stream: true,
        temperature: Number($("temperature").value),
        top_p: Number($("top_p").value),
        max_tokens: Number($("max_tokens").value),
      }),
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const piece = chunk.choices[0]?.delta?.content;
      if (piece) {
        answer += piece;
        out.textContent = answer;
        out.scrollIntoView({ block: "end" });
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      const err = addTurn("error", "error: " + e.message);
      err.classList.add("error");
    }
  } finally {
    // A stopped answer stays in the conversation, as far as it got.
    if (answer) {
      convo.push({ role: "assistant", content: answer });
    } else {
      convo.pop();  // no answer: leave the unanswered question out of what the model sees
      out.remove();
    }
    controller = null;
    busy(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadModel().catch(() => {});  // the model name shows once reachable; sending retries
  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new_chat").addEventListener("click", () => {
    if (controller) controller.abort();
    messages = [];
    $("log").replaceChildren();
  });
});
