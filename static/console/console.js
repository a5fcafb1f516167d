/* The chat console (templates/console/chat.html). Plain JavaScript, no dependencies.
 *
 * It chats over the WebSocket endpoint ws(s)://<host>/ws/agents/<name>/chat/, signed in by the
 * admin's session cookie (same origin), and reads sessions and sends feedback through
 * /console/api/. Protocol: client frames message {content, session_id}, cancel, ping; server
 * frames ready (signed in), start, delta, tool_call, tool_result, usage, done, error, pong;
 * close codes 4401 (signed out), 4403 (not allowed), 4404 (no such agent), 4429 (rate
 * limited), 4408 (idle: reconnected). Every message names its session explicitly (null: a new
 * one), since a connection otherwise continues the last session it served. No
 * idempotency_key: the server honours it on API-key connections only.
 *
 * Everything a model, a tool or a user wrote is put on the page as text (textContent and text
 * nodes), never as HTML.
 */
(function () {
  "use strict";

  var config = JSON.parse(document.getElementById("console-config").textContent);
  var SESSIONS_PAGE = 20;
  var PING_MS = 25000;
  var FINAL_CLOSE_CODES = {
    4401: "You are signed out. Sign in to the admin again, then reload this page.",
    4403: "You may not chat with this agent.",
    4404: "This agent does not exist or is disabled."
  };

  var $ = function (id) { return document.getElementById(id); };
  var ui = {
    agent: $("cc-agent"), agentInfo: $("cc-agent-info"), newChat: $("cc-new"), sessions: $("cc-sessions"),
    more: $("cc-more"), title: $("cc-title"), status: $("cc-status"), log: $("cc-log"), empty: $("cc-empty"),
    form: $("cc-form"), input: $("cc-input"), send: $("cc-send"), cancel: $("cc-cancel")
  };

  var state = {
    agent: null,          // the selected agent's name
    sessionId: null,      // the conversation being continued (null: the next message starts one)
    ws: null,
    open: false,          // signed in on the socket (the `ready` frame): messages may be sent
    signedOut: false,
    lastErrorAt: 0,       // when the last error frame came (one just before a close explains it)
    turn: null,           // the Turn being streamed
    retries: 0,
    reconnectTimer: null,
    pingTimer: null,
    sessionsOffset: 0,
    loadingSession: false
  };

  // --- small helpers ------------------------------------------------------------------------

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function agentByName(name) {
    for (var i = 0; i < config.agents.length; i++) {
      if (config.agents[i].name === name) return config.agents[i];
    }
    return null;
  }

  function fmtCost(value) {
    if (value === null || value === undefined || value === "") return "";
    var n = Number(value);
    if (!isFinite(n)) return "";
    if (n === 0) return "$0";
    if (n < 0.000001) return "< $0.000001";
    if (n >= 1) return "$" + n.toFixed(2);
    if (n >= 0.01) return "$" + n.toFixed(4);
    return "$" + n.toFixed(6).replace(/0+$/, "");
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "";
    return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(1) + " s";
  }

  function fmtWhen(iso) {
    var t = new Date(iso);
    if (isNaN(t.getTime())) return "";
    var seconds = (Date.now() - t.getTime()) / 1000;
    if (seconds < 60) return "just now";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return t.toLocaleDateString();
  }

  function pretty(text) {
    if (text === null || text === undefined) return "";
    if (typeof text !== "string") return JSON.stringify(text, null, 2);
    try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
  }

  function scrollDown(force) {
    var log = ui.log;
    // Follow the stream unless the reader scrolled up to read something.
    if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
  }

  function svgIcon(pathData) {
    var ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "16");
    svg.setAttribute("height", "16");
    svg.setAttribute("aria-hidden", "true");
    var path = document.createElementNS(ns, "path");
    path.setAttribute("d", pathData);
    path.setAttribute("fill", "currentColor");
    svg.appendChild(path);
    return svg;
  }

  var THUMB = "M2 21h4V9H2v12zm20-11a2 2 0 0 0-2-2h-6.3l.95-4.57.03-.32c0-.41-.17-.79-.44-1.06L13.17 1 " +
              "6.59 7.59C6.22 7.95 6 8.45 6 9v10a2 2 0 0 0 2 2h9c.83 0 1.54-.5 1.84-1.22l3.02-7.05c.09-.23.14-.47.14-.73v-2z";

  // --- the JSON API ---------------------------------------------------------------------------

  function api(method, url, body) {
    var headers = { "Accept": "application/json" };
    var options = { method: method, credentials: "same-origin", headers: headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      headers["X-CSRFToken"] = config.csrfToken;
      options.body = JSON.stringify(body);
    }
    return fetch(url, options).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        if (!response.ok) {
          var error = (data && data.error) || { code: "http_" + response.status, message: response.statusText };
          error.status = response.status;
          if (response.status === 401) showSignedOut();
          throw error;
        }
        return data;
      });
    });
  }

  // --- status and controls ----------------------------------------------------------------------

  function setStatus(kind, text) {
    ui.status.dataset.state = kind;
    ui.status.textContent = text;
  }

  function updateControls() {
    var streaming = state.turn !== null;
    var ready = !!state.agent && !state.loadingSession;
    ui.input.disabled = !ready;
    ui.send.disabled = !ready || streaming || !state.open;
    ui.send.textContent = streaming ? "Streaming…" : "Send";
    ui.cancel.hidden = !streaming;
    ui.agent.disabled = streaming;
    ui.newChat.disabled = !state.agent || streaming;
    var items = ui.sessions.querySelectorAll("button");
    for (var i = 0; i < items.length; i++) items[i].disabled = streaming;
  }

  function showSignedOut() {
    // Once: the JSON API and the socket may both find out.
    if (state.signedOut) return;
    state.signedOut = true;
    if (state.turn) {
      state.turn.showError("not_authenticated", "Signed out before the reply finished.");
      endTurn();
    }
    disconnect();
    setStatus("error", "Signed out");
    notice("error", "not_authenticated", FINAL_CLOSE_CODES[4401], { login: true });
    updateControls();
  }

  function hideEmpty() {
    if (ui.empty && ui.empty.parentNode) ui.empty.parentNode.removeChild(ui.empty);
  }

  function clearLog(hint) {
    while (ui.log.firstChild) ui.log.removeChild(ui.log.firstChild);
    if (hint) {
      ui.empty = el("p", "cc-empty", hint);
      ui.log.appendChild(ui.empty);
    }
  }

  function notice(kind, code, message, extra) {
    hideEmpty();
    var box = el("div", "cc-notice cc-notice-" + kind);
    box.setAttribute("role", kind === "error" ? "alert" : "status");
    if (code) box.appendChild(el("code", "cc-code", code));
    box.appendChild(el("span", "cc-notice-text", message));
    if (extra && extra.login) {
      var link = el("a", "cc-link", "Sign in");
      link.href = config.loginUrl + "?next=" + encodeURIComponent(location.pathname + location.search);
      box.appendChild(link);
    }
    ui.log.appendChild(box);
    scrollDown(true);
    return box;
  }

  // --- one answer on the page -----------------------------------------------------------------

  function appendUser(text) {
    hideEmpty();
    var msg = el("article", "cc-msg cc-user");
    msg.appendChild(el("div", "cc-who", config.user || "You"));
    msg.appendChild(el("div", "cc-text", text));
    ui.log.appendChild(msg);
    scrollDown(true);
  }

  function Turn(options) {
    hideEmpty();
    this.runId = null;
    this.model = null;
    this.usage = null;
    this.textEl = null;
    this.live = !!(options && options.live);
    this.node = el("article", "cc-msg cc-assistant" + (this.live ? " is-streaming" : ""));
    this.node.appendChild(el("div", "cc-who", state.agent || "agent"));
    this.body = el("div", "cc-body");
    this.node.appendChild(this.body);
    this.meta = el("div", "cc-meta");
    this.node.appendChild(this.meta);
    if (this.live) {
      this.waiting = el("span", "cc-waiting", "Thinking…");
      this.body.appendChild(this.waiting);
    }
    ui.log.appendChild(this.node);
    scrollDown(true);
  }

  Turn.prototype.setRun = function (runId) {
    this.runId = runId || null;
    if (this.runId) this.node.dataset.runId = this.runId;
  };

  Turn.prototype.stopWaiting = function () {
    if (this.waiting && this.waiting.parentNode) this.waiting.parentNode.removeChild(this.waiting);
    this.waiting = null;
  };

  Turn.prototype.appendText = function (text) {
    if (!text) return;
    this.stopWaiting();
    if (!this.textEl) {
      this.textEl = el("div", "cc-text");
      this.body.appendChild(this.textEl);
    }
    // One text node per delta: the reply grows token by token, and nothing is parsed as HTML.
    this.textEl.appendChild(document.createTextNode(text));
    scrollDown(false);
  };

  Turn.prototype.addToolCall = function (name, args) {
    this.stopWaiting();
    this.textEl = null;  // text after the tool call goes below it
    var block = el("details", "cc-tool");
    block.open = this.live;
    var summary = el("summary", "cc-tool-head");
    summary.appendChild(el("span", "cc-tool-kind", "Tool call"));
    summary.appendChild(el("code", "cc-tool-name", name || "?"));
    block.appendChild(summary);
    block.appendChild(el("div", "cc-tool-label", "Arguments"));
    block.appendChild(el("pre", "cc-pre", pretty(args) || "{}"));
    block.dataset.tool = name || "";
    this.body.appendChild(block);
    scrollDown(false);
    return block;
  };

  Turn.prototype.addToolResult = function (name, content) {
    this.stopWaiting();
    var blocks = this.body.querySelectorAll("details.cc-tool:not(.has-result)");
    var block = null;
    for (var i = 0; i < blocks.length; i++) {
      if (blocks[i].dataset.tool === (name || "")) { block = blocks[i]; break; }
    }
    if (!block) block = this.addToolCall(name, "");
    block.classList.add("has-result");
    block.appendChild(el("div", "cc-tool-label", "Result"));
    block.appendChild(el("pre", "cc-pre", pretty(content)));
    this.textEl = null;
    scrollDown(false);
  };

  Turn.prototype.showError = function (code, message, retryAfter) {
    this.stopWaiting();
    var box = el("div", "cc-notice cc-notice-error");
    box.setAttribute("role", "alert");
    if (code) box.appendChild(el("code", "cc-code", code));
    var text = message || "The agent could not answer.";
    if (retryAfter) text += " Try again in " + Math.ceil(Number(retryAfter)) + " s.";
    box.appendChild(el("span", "cc-notice-text", text));
    this.body.appendChild(box);
    scrollDown(true);
  };

  Turn.prototype.setMeta = function (info) {
    while (this.meta.firstChild) this.meta.removeChild(this.meta.firstChild);
    var chips = [];
    if (info.model) chips.push(["model", info.model]);
    if (info.variant) chips.push(["variant", "variant " + info.variant]);
    var usage = info.usage;
    if (usage && (usage.prompt_tokens !== undefined || usage.completion_tokens !== undefined)) {
      chips.push(["tokens", (usage.prompt_tokens || 0) + " in · " + (usage.completion_tokens || 0) + " out tokens"]);
    }
    var cost = fmtCost(info.cost_usd);
    if (cost) chips.push(["cost", cost]);
    if (info.latency_ms !== undefined && info.latency_ms !== null) chips.push(["latency", fmtMs(info.latency_ms)]);
    if (info.cancelled) chips.push(["flag", "cancelled"]);
    if (info.status === "failed") chips.push(["flag", "failed"]);
    for (var i = 0; i < chips.length; i++) {
      this.meta.appendChild(el("span", "cc-chip cc-chip-" + chips[i][0], chips[i][1]));
    }
  };

  Turn.prototype.showFeedback = function (runId, current) {
    if (!runId) return;
    var box = el("span", "cc-feedback");
    var turn = this;
    var buttons = {};
    [[1, "Good answer", "cc-up"], [-1, "Bad answer", "cc-down"]].forEach(function (spec) {
      var button = el("button", "cc-thumb " + spec[2]);
      button.type = "button";
      button.title = spec[1];
      button.setAttribute("aria-label", spec[1]);
      button.setAttribute("aria-pressed", current === spec[0] ? "true" : "false");
      button.appendChild(svgIcon(THUMB));
      button.addEventListener("click", function () {
        var pressed = button.getAttribute("aria-pressed") === "true";
        turn.sendFeedback(runId, pressed ? null : spec[0], buttons, 0);
      });
      buttons[spec[0]] = button;
      box.appendChild(button);
    });
    this.feedbackNote = el("span", "cc-feedback-note");
    box.appendChild(this.feedbackNote);
    this.meta.appendChild(box);
  };

  Turn.prototype.sendFeedback = function (runId, value, buttons, attempt) {
    var turn = this;
    buttons[1].disabled = buttons[-1].disabled = true;
    api("POST", config.api.feedback, { run_id: runId, value: value }).then(function (data) {
      buttons[1].setAttribute("aria-pressed", data.feedback === 1 ? "true" : "false");
      buttons[-1].setAttribute("aria-pressed", data.feedback === -1 ? "true" : "false");
      turn.feedbackNote.textContent = data.feedback === null ? "" : "Thanks!";
      buttons[1].disabled = buttons[-1].disabled = false;
    }).catch(function (error) {
      // The run is stored a moment after `done` is sent: retry briefly before giving up.
      if (error.code === "run_not_found" && attempt < 8) {
        setTimeout(function () { turn.sendFeedback(runId, value, buttons, attempt + 1); }, 250 * (attempt + 1));
        return;
      }
      buttons[1].disabled = buttons[-1].disabled = false;
      turn.feedbackNote.textContent = "Not saved: " + (error.message || "error");
    });
  };

  Turn.prototype.finish = function () {
    this.stopWaiting();
    this.live = false;
    this.node.classList.remove("is-streaming");
  };

  // --- the WebSocket --------------------------------------------------------------------------

  function wsUrl(agent) {
    var scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + config.wsPath.replace("{name}", encodeURIComponent(agent));
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    if (!state.agent || state.ws || state.signedOut) return;
    var ws;
    try {
      ws = new WebSocket(wsUrl(state.agent));
    } catch (e) {
      setStatus("error", "Cannot connect");
      return;
    }
    state.ws = ws;
    state.open = false;
    setStatus("connecting", "Connecting…");
    updateControls();
    ws.onopen = function () {
      if (state.ws !== ws) return;
      setStatus("connecting", "Signing in…");
      clearInterval(state.pingTimer);
      state.pingTimer = setInterval(function () {
        if (state.ws === ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "ping" }));
      }, PING_MS);
    };
    ws.onmessage = function (event) {
      if (state.ws !== ws) return;
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      if (frame && typeof frame === "object") handleFrame(frame);
    };
    ws.onclose = function (event) {
      if (state.ws !== ws) return;
      state.ws = null;
      state.open = false;
      clearInterval(state.pingTimer);
      closed(event.code);
    };
  }

  function disconnect() {
    var ws = state.ws;
    state.ws = null;
    state.open = false;
    clearInterval(state.pingTimer);
    clearTimeout(state.reconnectTimer);
    if (ws) ws.close(1000);
  }

  function closed(code) {
    if (state.turn) {
      state.turn.showError("connection_closed", "The connection closed before the reply finished.");
      endTurn();
    }
    if (code === 4401) {
      showSignedOut();
      return;
    }
    if (FINAL_CLOSE_CODES[code]) {
      setStatus("error", code === 4401 ? "Signed out" : "Unavailable");
      if (Date.now() - state.lastErrorAt > 2000) {
        notice("error", "close " + code, FINAL_CLOSE_CODES[code]);
      }
      updateControls();
      return;
    }
    // Anything else (server restart, network, 4429): reconnect with backoff.
    var delay = Math.min(15000, 500 * Math.pow(2, state.retries)) + Math.random() * 250;
    if (code === 4429) delay = Math.max(delay, 5000);
    state.retries += 1;
    setStatus("closed", (code === 4429 ? "Rate limited" : "Disconnected") + ", retrying in " +
              Math.ceil(delay / 1000) + " s");
    updateControls();
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function handleFrame(frame) {
    var turn = state.turn;
    switch (frame.type) {
      case "ready":
        state.open = true;
        state.retries = 0;
        setStatus("open", "Connected");
        updateControls();
        return;
      case "start":
        if (!turn) return;
        turn.setRun(frame.run_id);
        turn.model = frame.model || null;
        turn.variant = frame.variant || null;
        turn.setMeta({ model: turn.model, variant: turn.variant });
        if (frame.session_id && frame.session_id !== state.sessionId) {
          state.sessionId = frame.session_id;
          updateUrl();
        }
        return;
      case "delta":
        if (turn) turn.appendText(frame.content);
        return;
      case "tool_call":
        if (turn) turn.addToolCall(frame.name, frame.arguments);
        return;
      case "tool_result":
        if (turn) turn.addToolResult(frame.name, frame.content);
        return;
      case "usage":
        if (!turn) return;
        turn.usage = frame.usage || frame;
        turn.setMeta({ model: turn.model, variant: turn.variant, usage: turn.usage });
        return;
      case "done":
      case "cancelled":
        if (!turn) return;
        turn.setRun(frame.run_id || turn.runId);
        turn.setMeta({ model: frame.model || turn.model, variant: turn.variant, usage: frame.usage || turn.usage,
                       cost_usd: frame.cost_usd, latency_ms: frame.latency_ms,
                       cancelled: frame.cancelled || frame.type === "cancelled" });
        turn.showFeedback(turn.runId, null);
        endTurn();
        loadSessions(true);
        return;
      case "error":
        state.lastErrorAt = Date.now();  // a close that follows at once needs no second notice
        if (frame.code === "authentication_required" || frame.code === "invalid_api_key") {
          showSignedOut();
        } else if (turn) {
          turn.showError(frame.code, frame.message, frame.retry_after);
          endTurn();
          if (turn.runId) loadSessions(true);
        } else {
          notice("error", frame.code, (frame.message || "Error") +
                 (frame.retry_after ? " Try again in " + Math.ceil(Number(frame.retry_after)) + " s." : ""));
        }
        return;
      default:
        return;  // pong, and frame types this page does not know yet
    }
  }

  function endTurn() {
    if (state.turn) state.turn.finish();
    state.turn = null;
    ui.cancel.disabled = false;
    ui.cancel.textContent = "Cancel";
    updateControls();
    ui.input.focus();
  }

  function sendMessage() {
    var text = ui.input.value.trim();
    if (!text || state.turn || !state.agent) return;
    if (!state.open || !state.ws) {
      connect();
      return;
    }
    var frame = { type: "message", content: text, session_id: state.sessionId };
    state.ws.send(JSON.stringify(frame));
    ui.input.value = "";
    if (!state.sessionId) ui.title.textContent = text.length > 60 ? text.slice(0, 60) + "…" : text;
    appendUser(text);
    state.turn = new Turn({ live: true });
    updateControls();
  }

  function cancelTurn() {
    if (!state.turn) return;
    if (state.ws && state.open) {
      state.ws.send(JSON.stringify({ type: "cancel" }));
      ui.cancel.disabled = true;
      ui.cancel.textContent = "Cancelling…";
    } else {
      endTurn();
    }
  }

  // --- sessions -------------------------------------------------------------------------------

  function loadSessions(reset) {
    if (!state.agent) return;
    var agent = state.agent;
    var offset = reset ? 0 : state.sessionsOffset;
    var query = "?agent=" + encodeURIComponent(agent) + "&limit=" + SESSIONS_PAGE + "&offset=" + offset;
    api("GET", config.api.sessions + query).then(function (data) {
      if (agent !== state.agent) return;
      if (reset) {
        while (ui.sessions.firstChild) ui.sessions.removeChild(ui.sessions.firstChild);
      }
      var results = data.results || [];
      results.forEach(function (session) { ui.sessions.appendChild(sessionItem(session)); });
      state.sessionsOffset = offset + results.length;
      ui.more.hidden = !data.next;
      if (!ui.sessions.firstChild) ui.sessions.appendChild(el("li", "cc-sessions-empty", "No sessions yet."));
      markActiveSession();
      updateControls();
    }).catch(function (error) {
      ui.more.hidden = true;
      if (error.status !== 401) notice("error", error.code, "Could not list sessions: " + (error.message || ""));
    });
  }

  function sessionItem(session) {
    var item = el("li", "cc-session");
    var button = el("button", "cc-session-button");
    button.type = "button";
    button.dataset.session = session.id;
    button.appendChild(el("span", "cc-session-title", session.title || "Untitled session"));
    button.appendChild(el("span", "cc-session-meta",
                          fmtWhen(session.last_activity_at) + " · " + session.message_count + " messages"));
    button.addEventListener("click", function () { openSession(session.id); });
    item.appendChild(button);
    return item;
  }

  function markActiveSession() {
    var buttons = ui.sessions.querySelectorAll("button[data-session]");
    for (var i = 0; i < buttons.length; i++) {
      var active = buttons[i].dataset.session === state.sessionId;
      buttons[i].classList.toggle("is-active", active);
      if (active) buttons[i].setAttribute("aria-current", "true"); else buttons[i].removeAttribute("aria-current");
    }
  }

  function openSession(id) {
    if (state.turn) return;
    state.loadingSession = true;
    updateControls();
    api("GET", config.api.sessions + "/" + encodeURIComponent(id)).then(function (data) {
      if (data.agent !== state.agent) selectAgent(data.agent, { keepSession: true });
      state.sessionId = data.id;
      clearLog();
      ui.title.textContent = data.title || "Untitled session";
      if (data.truncated) notice("info", null, "Older messages of this session are not shown.");
      renderHistory(data);
      updateUrl();
      markActiveSession();
      scrollDown(true);
    }).catch(function (error) {
      if (error.status !== 401) notice("error", error.code, "Could not open the session: " + (error.message || ""));
    }).then(function () {
      state.loadingSession = false;
      updateControls();
      ui.input.focus();
    });
  }

  function renderHistory(data) {
    var runs = {};
    (data.runs || []).forEach(function (run) { runs[run.id] = run; });
    var current = null;  // the answer being rebuilt: {runId, turn}
    function close() {
      if (!current) return;
      var run = runs[current.runId];
      var turn = current.turn;
      if (run) {
        if (!turn) turn = new Turn({ live: false });
        turn.setRun(run.id);
        if (run.error && run.status === "failed") turn.showError(run.error.code, run.error.message);
        turn.setMeta({ model: run.model, usage: run.usage, cost_usd: run.cost_usd, latency_ms: run.latency_ms,
                       cancelled: run.status === "cancelled", status: run.status });
        turn.showFeedback(run.id, run.feedback);
      }
      if (turn) turn.finish();
      current = null;
    }
    (data.messages || []).forEach(function (m) {
      if (m.role === "system") return;
      if (m.role === "user") {
        if (!current || current.runId !== m.run_id || current.turn) {
          close();
          current = { runId: m.run_id, turn: null };
        }
        appendUser(m.content);
        return;
      }
      if (!current || current.runId !== m.run_id) {
        close();
        current = { runId: m.run_id, turn: null };
      }
      if (!current.turn) current.turn = new Turn({ live: false });
      var turn = current.turn;
      if (m.role === "assistant") {
        (m.tool_calls || []).forEach(function (call) {
          var fn = call["function"] || {};
          turn.addToolCall(call.name || fn.name, call.arguments !== undefined ? call.arguments : fn.arguments);
        });
        turn.appendText(m.content);
      } else if (m.role === "tool") {
        turn.addToolResult(m.name, m.content);
      }
    });
    close();
  }

  // --- agents -------------------------------------------------------------------------------

  function updateUrl() {
    if (!state.agent) return;
    var url = config.consoleUrl + encodeURIComponent(state.agent) + "/";
    if (state.sessionId) url += "?session=" + encodeURIComponent(state.sessionId);
    history.replaceState(null, "", url);
  }

  function showAgentInfo(agent) {
    var info = ui.agentInfo;
    while (info.firstChild) info.removeChild(info.firstChild);
    if (!agent) return;
    if (agent.description) info.appendChild(el("span", "cc-agent-desc", agent.description));
    var facts = el("span", "cc-agent-facts");
    facts.appendChild(el("code", null, agent.model));
    if (agent.skills && agent.skills.length) facts.appendChild(document.createTextNode(" · skills: " + agent.skills.join(", ")));
    info.appendChild(facts);
  }

  function startNewChat() {
    state.sessionId = null;
    clearLog(state.agent ? "Send a message to start a new chat with " + state.agent +
             ". Replies stream in as they are written; tool calls, tokens and cost show under each answer." :
             "Pick an agent to start chatting.");
    ui.title.textContent = "New chat";
    updateUrl();
    markActiveSession();
    updateControls();
    ui.input.focus();
  }

  function selectAgent(name, options) {
    var agent = agentByName(name);
    if (state.agent === (agent ? agent.name : null)) return;
    disconnect();
    state.agent = agent ? agent.name : null;
    state.retries = 0;
    ui.agent.value = state.agent || "";
    showAgentInfo(agent);
    while (ui.sessions.firstChild) ui.sessions.removeChild(ui.sessions.firstChild);
    ui.more.hidden = true;
    try { if (state.agent) window.localStorage.setItem("console.agent", state.agent); } catch (e) { /* private mode */ }
    if (!(options && options.keepSession)) startNewChat();
    if (!state.agent) {
      setStatus("idle", "Not connected");
      updateControls();
      return;
    }
    connect();
    loadSessions(true);
    updateControls();
  }

  // --- wiring ---------------------------------------------------------------------------------

  ui.agent.addEventListener("change", function () { selectAgent(ui.agent.value); });
  ui.newChat.addEventListener("click", startNewChat);
  ui.more.addEventListener("click", function () { loadSessions(false); });
  ui.cancel.addEventListener("click", cancelTurn);
  ui.form.addEventListener("submit", function (event) {
    event.preventDefault();
    sendMessage();
  });
  ui.input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    } else if (event.key === "Escape" && state.turn) {
      cancelTurn();
    }
  });
  window.addEventListener("online", function () { if (!state.ws && state.agent) connect(); });

  var initial = config.agent;
  if (!initial) {
    try { initial = window.localStorage.getItem("console.agent"); } catch (e) { initial = null; }
    if (!agentByName(initial)) initial = config.agents.length === 1 ? config.agents[0].name : null;
  }
  var wanted = new URLSearchParams(location.search).get("session");
  if (initial) selectAgent(initial, { keepSession: !!wanted });
  if (wanted && initial) openSession(wanted);
  updateControls();
})();
