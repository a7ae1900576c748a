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

// The server's one-line reason from an OpenAI error body, or the HTTP status when there is none
// (a proxy's HTML page, a crash).
async function failure(response) {
  try {
    return new Error((await response.json()).error.message);
  } catch {
    return new Error(`HTTP ${response.status} ${response.statusText}`);
  }
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) throw await failure(r);
  modelName = (await r.json()).data[0].id;
  $("model").textContent = modelName;
}

// The sampling settings that are filled in; an empty box leaves the server's default.
function settings() {
  const chosen = {};
  for (const name of ["temperature", "top_p", "max_tokens"]) {
    const box = $(name);
    if (box.value.trim() !== "") chosen[name] = Number(box.value);
  }
  return chosen;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Reads server-sent events ("data: {...}\n\n") from the response body as they arrive, up to
// the server's "[DONE]"; a body that ends before it was cut off (the server stopped or crashed).
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the answer was cut off: the server closed the stream before it ended");
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
  const question = addTurn("user", text);
  const out = addTurn("assistant", "");
  controller = new AbortController();
  busy(true);
  let answer = "";
  try {
    if (!modelName) await loadModel();
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: modelName, messages: convo, stream: true, ...settings(),
      }),
    });
    if (!response.ok) throw await failure(response);
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
    if (e.name === "AbortError") {
      out.classList.add("stopped");
    } else if (convo === messages) {
      addTurn("error", "error: " + e.message);
    }
  } finally {
    // A stopped answer stays in the conversation, as far as it got.
    if (answer) {
      convo.push({ role: "assistant", content: answer });
    } else {
      // No answer: the question leaves the conversation and goes back to the input box, to
      // send again or edit (unless "New chat" has already cleared it all away).
      convo.pop();
      out.remove();
      question.remove();
      if (convo === messages && !$("input").value) $("input").value = text;
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
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {  // not while an IME composes
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
