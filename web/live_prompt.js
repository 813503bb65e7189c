// Self Forcing: a live prompt box on the Stream Sampler. While the sampler streams, "Send" posts the text to
// the pack's route (POST /selfforcing/steer); the sampler encodes it with its CLIP and switches at the next
// chunk boundary, and its status line shows the switch. The box is not part of the workflow (not serialized).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLER = "SelfForcingStreamSampler";
let runningPrompt = null; // the prompt this client is executing, from the execution events

api.addEventListener("execution_start", (e) => { runningPrompt = e.detail?.prompt_id ?? null; });
for (const done of ["execution_success", "execution_error", "execution_interrupted"]) {
  api.addEventListener(done, () => { runningPrompt = null; });
}

async function send(node, text, say) {
  if (!text.trim()) { say("write a prompt first", true); return; }
  const body = { node_id: String(node.id), text, client_id: api.clientId };
  if (runningPrompt) body.prompt_id = runningPrompt;
  try {
    const res = await api.fetchApi("/selfforcing/steer", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const answer = await res.json().catch(() => ({}));
    if (res.ok) say(`sent: switches at chunk ${answer.applies_at_chunk + 1}`, false);
    else say(answer.error || `refused (${res.status})`, true);
    return res.ok;
  } catch (err) {
    say(`not sent: ${err}`, true);
  }
}

app.registerExtension({
  name: "SelfForcing.LivePrompt",
  async nodeCreated(node) {
    if (node.comfyClass !== SAMPLER) return;
    const box = document.createElement("div");
    box.dataset.sfLivePrompt = String(node.id);
    // the id is final only once the node is in a graph (loading a workflow sets it after creation)
    const draw = node.onDrawForeground;
    node.onDrawForeground = function (...args) {
      if (box.dataset.sfLivePrompt !== String(this.id)) box.dataset.sfLivePrompt = String(this.id);
      return draw?.apply(this, args);
    };
    box.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;box-sizing:border-box";
    const text = document.createElement("textarea");
    text.className = "comfy-multiline-input";
    text.placeholder = "Live prompt: type while the stream runs, then Send (Ctrl+Enter)";
    text.style.cssText = "flex:1;min-height:36px;resize:none";
    const row = document.createElement("div");
    row.style.cssText = "display:flex;gap:6px;align-items:center";
    const button = document.createElement("button");
    button.textContent = "Send prompt";
    button.style.cssText = "cursor:pointer";
    const note = document.createElement("span");
    note.className = "sf-live-prompt-answer";
    note.style.cssText = "font-size:11px;opacity:0.8;overflow:hidden;white-space:nowrap;text-overflow:ellipsis";
    row.append(button, note);
    box.append(text, row);
    const say = (msg, bad) => { note.textContent = msg; note.style.color = bad ? "#f77" : ""; note.title = msg; };
    const go = async () => { if (await send(node, text.value, say)) text.value = ""; };
    button.addEventListener("click", go);
    text.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); go(); } });
    const widget = node.addDOMWidget("live_prompt", "sf_live_prompt", box, {
      serialize: false, getValue: () => text.value, setValue: (v) => { text.value = v ?? ""; },
      getMinHeight: () => 70,
    });
    widget.serialize = false;
  },
});
