// The browser console: speaks the real /conversation protocol (docs/PROTOCOL.md) like the app does.
// No build step and no third-party code: this file, pcm-worklet.js, index.html and console.css.

const SAMPLE_RATE = 16000;
const CHUNK_SAMPLES = SAMPLE_RATE / 4; // 0.25 s per audio_stream chunk
const OTHER = "对方";
const ME = "我";
const LOG_LIMIT = 200;
// The server closes a connection that sends nothing for WEBSOCKET_TIMEOUT (default 300 s).
const HEARTBEAT_MS = 60000;

const STT_MODES = { vosk: "Vosk 真实识别", mock: "模拟识别（mock）" };
const LLM_MODES = { openrouter: "OpenRouter 真实生成", mock: "模拟生成（mock）" };
const HEALTH_STATES = { healthy: "正常", degraded: "降级", unavailable: "不可用" };
const EVENT_NAMES = {
  session_created: "会话已创建",
  session_restored: "会话已恢复",
  message_recorded: "消息已记录",
  opinion_suggestions: "观点关键词",
  llm_response: "回复建议",
  suggestion_partial: "逐条建议",
  opinion_prediction_response: "反应预测",
  transcript_partial: "实时字幕",
  status_update: "状态",
  error: "错误",
};

const $ = (id) => document.getElementById(id);

const state = {
  ws: null,
  connected: false,
  reconnectDelay: 500,
  sessionId: null,
  microphone: null, // {context, node, stream}
  recording: null, // {sessionId, chunks: Int16Array[] sent so far, refused: bool}
  holding: false,
  pendingAudio: [], // sent recordings (WAV blobs) waiting for their message_recorded, in order
  streamed: { opinions: null, replies: null }, // request_id of the list being filled by suggestion_partial
  resuming: false,
  repliesAnswered: false,
};

// ------------------------------------------------------------------------------------------
// Connection

function conversationUrl() {
  // Relative to the page, so it works behind a proxy prefix; wss when the page is https.
  const url = new URL("conversation", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function connect() {
  setConnection("connecting", "正在连接服务…");
  const ws = new WebSocket(conversationUrl());
  state.ws = ws;
  ws.onopen = () => {
    state.connected = true;
    state.reconnectDelay = 500;
    setConnection("open", "已连接");
    // A session outlives a dropped connection where the server supports it; the answer to
    // session_resume is session_restored or an error, before any other event.
    if (state.sessionId) state.resuming = send("session_resume", { session_id: state.sessionId });
    refreshControls();
  };
  ws.onmessage = (frame) => handleEvent(JSON.parse(frame.data));
  ws.onclose = () => {
    state.connected = false;
    setConnection("closed", "连接已断开，正在重连…");
    refreshControls();
    window.setTimeout(connect, state.reconnectDelay);
    state.reconnectDelay = Math.min(state.reconnectDelay * 2, 10000);
  };
}

function send(type, data) {
  if (!state.connected) {
    showError({ error_code: "CONNECTION", message: "未连接到服务，操作没有发出" });
    return false;
  }
  state.ws.send(JSON.stringify({ type, data }));
  if (type !== "audio_stream" && type !== "heartbeat") logEvent("→", type, data);
  return true;
}

function setConnection(kind, text) {
  const badge = $("connection");
  badge.dataset.state = kind;
  badge.textContent = text;
}

// ------------------------------------------------------------------------------------------
// Server events

const handlers = {
  session_created(data) {
    state.sessionId = data.session_id;
    $("session").textContent = `会话：${data.session_id}`;
    clearList("messages");
    clearList("opinions");
    clearList("replies");
    refreshControls();
  },
  session_restored(data) {
    state.resuming = false;
    $("session").textContent = `会话已恢复：${data.session_id}（${data.message_count} 条消息）`;
  },
  status_update(data) {
    setStatus(data.message || data.status);
  },
  transcript_partial(data) {
    $("partial").textContent = data.text;
  },
  message_recorded(data) {
    $("partial").textContent = "";
    // Recorded speech is `msg_NNN`; the reply the user picked is `usr_NNN`.
    const audio = data.message_id.startsWith("msg_") ? state.pendingAudio.shift() : null;
    addMessage(data, audio);
    setStatus("消息已记录");
  },
  suggestion_partial(data) {
    const kind = data.kind === "opinions" ? "opinions" : "replies";
    if (state.streamed[kind] !== data.request_id) {
      state.streamed[kind] = data.request_id;
      if (kind === "replies") state.repliesAnswered = false;
      clearList(kind);
    }
    placeSuggestion(kind, data.index, data.text, true);
  },
  opinion_suggestions(data) {
    state.streamed.opinions = null;
    clearList("opinions");
    data.suggestions.forEach((text, index) => placeSuggestion("opinions", index, text, false));
    // The server sends no status_update(idle) by default: the result itself ends the wait.
    setStatus("观点关键词已就绪");
  },
  llm_response(data) {
    state.streamed.replies = null;
    state.repliesAnswered = false;
    clearList("replies");
    data.suggestions.forEach((text, index) => placeSuggestion("replies", index, text, false));
    setStatus("回复建议已就绪");
  },
  opinion_prediction_response(data) {
    const { tendency, mood, tone } = data.prediction;
    $("prediction").textContent = `对方可能的反应：${tendency}；情绪：${mood}；语气：${tone}`;
  },
  error(data) {
    showError(data);
    if (data.error_code === "STT_OVERLOADED" && state.recording) state.recording.refused = true;
    if (state.resuming) {
      state.resuming = false;
      endSession("连接断开后会话已结束，请重新开始对话");
    } else if (["SESSION_NOT_FOUND", "SESSION_EXPIRED"].includes(data.error_code) && data.session_id === state.sessionId) {
      endSession("会话已失效，请重新开始对话");
    }
  },
};

function handleEvent(event) {
  logEvent("←", event.type, event.data);
  const handler = handlers[event.type];
  if (handler) handler(event.data || {});
}

// ------------------------------------------------------------------------------------------
// Conversation controls

function listOf(id) {
  return $(id)
    .value.split(/[,，、]/)
    .map((item) => item.trim())
    .filter(Boolean);
}

function targetProfile() {
  const profile = {};
  const name = $("profile-name").value.trim();
  const gender = $("profile-gender").value.trim();
  const age = Number.parseInt($("profile-age").value, 10);
  if (name) profile.name = name;
  if (gender) profile.gender = gender;
  if (Number.isInteger(age)) profile.age = age;
  const lists = {
    relations: "profile-relations",
    personalities: "profile-personalities",
    preferences: "profile-preferences",
    taboos: "profile-taboos",
    common_topics: "profile-topics",
  };
  for (const [field, id] of Object.entries(lists)) {
    const values = listOf(id);
    if (values.length) profile[field] = values;
  }
  return Object.keys(profile).length ? profile : null;
}

function startConversation(event) {
  event.preventDefault();
  if (state.sessionId) send("conversation_end", { session_id: state.sessionId });
  const data = {
    response_count: Number($("response-count").value),
    scenario_description: $("scenario").value.trim(),
    options: {
      partial_transcripts: $("opt-partials").checked,
      stream_suggestions: $("opt-stream").checked,
      opinion_prediction: $("opt-prediction").checked,
    },
  };
  const profile = targetProfile();
  if (profile) data.target_profile = profile;
  state.sessionId = null;
  state.pendingAudio = [];
  send("conversation_start", data);
}

function endSession(text) {
  state.sessionId = null;
  state.pendingAudio = [];
  $("session").textContent = text;
  refreshControls();
}

function endConversation() {
  if (state.sessionId && send("conversation_end", { session_id: state.sessionId })) endSession("对话已结束");
}

function generate(opinion) {
  const data = { session_id: state.sessionId, focused_message_ids: [] };
  if (opinion) data.user_opinion = opinion;
  send("manual_generate", data);
}

function modify() {
  const modification = $("modification").value.trim();
  if (!modification) return;
  if (send("user_modification", { session_id: state.sessionId, modification })) $("modification").value = "";
}

function pickReply(text, button) {
  if (state.repliesAnswered) return;
  if (!send("user_selected_response", { session_id: state.sessionId, selected_content: text, sender: ME })) return;
  state.repliesAnswered = true;
  $("prediction").textContent = "";
  for (const other of $("replies").querySelectorAll("button")) other.disabled = other !== button;
  button.classList.add("chosen");
  speak(text);
}

function speak(text) {
  const note = $("speech");
  if (!("speechSynthesis" in window)) {
    note.textContent = "这个浏览器不支持语音合成，无法朗读";
    return;
  }
  const utterance = new SpeechSynthesisUtterance(text);
  utterance.lang = "zh-CN";
  utterance.onstart = () => (note.textContent = `正在朗读：${text}`);
  utterance.onend = () => (note.textContent = "朗读完毕");
  utterance.onerror = (event) => (note.textContent = `朗读失败（${event.error}），请检查浏览器的语音设置`);
  note.textContent = `准备朗读：${text}`;
  window.speechSynthesis.cancel();
  window.speechSynthesis.speak(utterance);
}

// ------------------------------------------------------------------------------------------
// Recording: hold the button; the worklet turns microphone audio into 16 kHz PCM16 chunks.

async function openMicrophone() {
  if (state.microphone) return state.microphone;
  if (!navigator.mediaDevices || !window.AudioWorkletNode) {
    throw new Error("这个浏览器不能录音（需要 https 或 localhost，以及支持 AudioWorklet 的浏览器）");
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  let context = new AudioContext({ sampleRate: SAMPLE_RATE });
  let source;
  try {
    source = context.createMediaStreamSource(stream);
  } catch {
    // Some browsers only take the microphone at the device's rate: the worklet resamples.
    await context.close();
    context = new AudioContext();
    source = context.createMediaStreamSource(stream);
  }
  await context.audioWorklet.addModule(new URL("pcm-worklet.js", import.meta.url));
  const node = new AudioWorkletNode(context, "pcm-recorder", {
    numberOfInputs: 1,
    numberOfOutputs: 0,
    processorOptions: { targetRate: SAMPLE_RATE, chunkSamples: CHUNK_SAMPLES },
  });
  node.port.onmessage = ({ data }) => onWorkletMessage(data);
  source.connect(node);
  state.microphone = { context, node, stream };
  return state.microphone;
}

function onWorkletMessage(data) {
  const recording = state.recording;
  if (!recording) return;
  if (data.pcm) {
    recording.chunks.push(data.pcm);
    const chunk = {
      session_id: recording.sessionId,
      audio_chunk: pcmToBase64(data.pcm),
      format: "pcm16",
      sample_rate: SAMPLE_RATE,
      channels: 1,
    };
    // A recording the server refused, or whose connection dropped, sends nothing more (one error shown).
    if (!recording.refused && !send("audio_stream", chunk)) recording.refused = true;
  } else if (data.done) {
    state.recording = null;
    if (!recording.refused && send("message_end", { session_id: recording.sessionId })) {
      state.pendingAudio.push(wavBlob(recording.chunks));
    }
    refreshControls();
  }
}

async function pressRecord() {
  if (state.holding || state.recording || !state.sessionId) return;
  state.holding = true;
  setRecordButton(true, "准备麦克风…");
  let microphone;
  try {
    microphone = await openMicrophone();
    await microphone.context.resume();
  } catch (error) {
    state.holding = false;
    setRecordButton(false);
    showError({ error_code: "MICROPHONE", message: `无法使用麦克风：${error.message || error}` });
    return;
  }
  if (!state.holding) {
    setRecordButton(false);
    return;
  }
  state.recording = { sessionId: state.sessionId, chunks: [], refused: false };
  $("partial").textContent = "";
  send("message_start", { session_id: state.sessionId, sender: OTHER });
  microphone.node.port.postMessage("start");
  setRecordButton(true, "正在录音…松开结束");
}

function releaseRecord() {
  if (!state.holding) return;
  state.holding = false;
  setRecordButton(false);
  if (state.recording && state.microphone) state.microphone.node.port.postMessage("stop");
}

function setRecordButton(pressed, text = "按住说话") {
  const button = $("record");
  button.setAttribute("aria-pressed", String(pressed));
  button.textContent = text;
}

function pcmToBase64(pcm) {
  const bytes = new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function wavBlob(chunks) {
  // The exact PCM this page sent, as a WAV file: what the message's transcript was made from.
  const length = chunks.reduce((sum, chunk) => sum + chunk.byteLength, 0);
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, value) => [...value].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + length, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, SAMPLE_RATE, true);
  header.setUint32(28, SAMPLE_RATE * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, length, true);
  return new Blob([header, ...chunks], { type: "audio/wav" });
}

// ------------------------------------------------------------------------------------------
// Rendering

function setStatus(text) {
  $("status").textContent = `状态：${text}`;
}

function clearList(id) {
  $(id).replaceChildren();
}

function addMessage(data, audio) {
  const item = document.createElement("li");
  item.className = "message";
  item.dataset.messageId = data.message_id;
  item.dataset.sender = data.sender;
  const who = document.createElement("span");
  who.className = "sender";
  who.textContent = data.sender;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = data.content;
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = data.message_id;
  item.append(who, text, id);
  if (data.content === "") {
    text.classList.add("empty");
    text.title = "没有识别出语音";
  }
  if (audio) {
    const link = document.createElement("a");
    link.className = "download";
    link.href = URL.createObjectURL(audio);
    link.download = `${data.message_id}.wav`;
    link.textContent = "下载录音";
    link.title = "这条消息发送给服务端的 16 kHz PCM 音频";
    item.append(link);
  }
  $("messages").append(item);
  item.scrollIntoView({ block: "nearest" });
}

function placeSuggestion(kind, index, text, streaming) {
  const list = $(kind);
  const item = document.createElement(kind === "opinions" ? "span" : "li");
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = text;
  button.classList.toggle("streaming", streaming);
  if (kind === "opinions") button.onclick = () => generate(text);
  else button.onclick = () => pickReply(text, button);
  button.disabled = !state.sessionId;
  item.append(button);
  item.dataset.index = String(index);
  const after = [...list.children].find((child) => Number(child.dataset.index) > index);
  const same = [...list.children].find((child) => Number(child.dataset.index) === index);
  if (same) same.replaceWith(item);
  else list.insertBefore(item, after || null);
}

function showError(data) {
  const item = document.createElement("li");
  const details = data.details === undefined || data.details === null ? "" : data.details;
  const shown = typeof details === "string" ? details : JSON.stringify(details);
  item.textContent = `${new Date().toLocaleTimeString("zh-CN")} ${data.message}（${data.error_code}${shown ? "：" + shown : ""}）`;
  $("errors").prepend(item);
}

function logEvent(direction, type, data) {
  const item = document.createElement("li");
  const name = EVENT_NAMES[type] ? `${type}（${EVENT_NAMES[type]}）` : type;
  item.textContent = `${direction} ${name} ${JSON.stringify(data)}`;
  const log = $("log");
  log.prepend(item);
  while (log.children.length > LOG_LIMIT) log.lastChild.remove();
}

function refreshControls() {
  const ready = state.connected && Boolean(state.sessionId);
  $("record").disabled = !ready;
  $("end").disabled = !ready;
  for (const id of ["generate", "modification", "modify"]) $(id).disabled = !ready;
  for (const button of document.querySelectorAll("#opinions button")) button.disabled = !ready;
  if (!ready) for (const button of document.querySelectorAll("#replies button")) button.disabled = true;
}

async function refreshEngines() {
  const badge = $("engines");
  try {
    const response = await fetch(new URL("conversation/health", window.location.href), { cache: "no-store" });
    const health = await response.json();
    const stt = health.engines.stt;
    const llm = health.engines.llm;
    badge.textContent =
      `语音识别：${STT_MODES[stt.mode] || stt.mode}（${HEALTH_STATES[stt.status] || stt.status}）` +
      ` · 回复生成：${LLM_MODES[llm.mode] || llm.mode}（${HEALTH_STATES[llm.status] || llm.status}）`;
    badge.dataset.state = health.status;
  } catch (error) {
    badge.textContent = "引擎状态：无法读取健康检查";
    badge.dataset.state = "closed";
  }
}

// ------------------------------------------------------------------------------------------
// Wiring

function wire() {
  $("start-form").addEventListener("submit", startConversation);
  $("end").addEventListener("click", endConversation);
  $("generate").addEventListener("click", () => generate(""));
  $("modify").addEventListener("click", modify);
  const record = $("record");
  record.addEventListener("pointerdown", (event) => {
    record.setPointerCapture(event.pointerId);
    pressRecord();
  });
  record.addEventListener("pointerup", releaseRecord);
  record.addEventListener("pointercancel", releaseRecord);
  record.addEventListener("keydown", (event) => {
    if (event.code === "Space" && !event.repeat) {
      event.preventDefault();
      pressRecord();
    }
  });
  record.addEventListener("keyup", (event) => {
    if (event.code === "Space") releaseRecord();
  });
  record.addEventListener("blur", releaseRecord);
  record.addEventListener("contextmenu", (event) => event.preventDefault()); // long press on touch screens
}

wire();
connect();
refreshEngines();
window.setInterval(refreshEngines, 15000);
window.setInterval(() => state.connected && send("heartbeat", {}), HEARTBEAT_MS);
