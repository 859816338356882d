"use strict";

/*
 * palaver's web page: one WebSocket to a node (docs/websocket.md), rooms on the left, the
 * chat in the middle, members on the right.
 *
 * What it keeps, and why:
 * - Per room, a version vector (for each message event, vv[replica] = max(vv, counter)) and
 *   the messages by id. After a reconnect it authenticates with the token kept in
 *   sessionStorage and subscribes with each vector: the node sends exactly what was missed, and
 *   messages replace each other by id, so nothing shows twice.
 * - The `nodes` list of the `hello` frame: when the socket dies it reconnects with backoff,
 *   to the same node first, then to the others.
 * - Posts wait in an outbox until acknowledged; a retry reuses the client message id, so a
 *   post retried after a lost answer is never duplicated.
 *
 * Everything a user wrote is put into the page with textContent, never as HTML.
 */
const Palaver = (() => {
  const HISTORY_PAGE_MESSAGES = 50;
  const BACKOFF_MS_MIN = 250;
  const BACKOFF_MS_MAX = 5_000;
  const CONNECT_TIMEOUT_MS = 5_000;
  const CALL_TIMEOUT_MS = 15_000;
  const PRESENCE_RENEW_MS = 30_000;
  const TYPING_RENEW_MS = 3_000;
  const ROOMS_REFRESH_MS = 60_000;
  const NODES_PROBE_MS = [5_000, 15_000, 60_000];
  const RESUBSCRIBE_MS_MIN = 1_000;
  const RESUBSCRIBE_MS_MAX = 30_000;
  const BANNER_CONNECTED_MS = 10_000;
  const ERROR_SHOWN_MS = 10_000;
  const MARK_READ_DELAY_MS = 300;
  const PENDING_AFTER_ACK_MS = 5_000;
  const REACTIONS = ["👍", "❤️", "😂", "🎉", "😮", "👀"];
  const ROLE_RANK = { member: 1, admin: 2, owner: 3 };
  const STORAGE_TOKEN = "palaver.token";
  const STORAGE_USER = "palaver.user";
  const STORAGE_ROOM = "palaver.room";

  /** The WebSocket and what belongs to one connection. */
  const conn = {
    ws: null,
    /** The URL of the socket being opened or open. */
    url: null,
    /** The URL of the node last connected to: reconnects try it first. */
    homeUrl: null,
    /** The id of the node connected to (from `hello`), or of the last one. */
    node: null,
    /** Every node's `{node, http_addr}` as the `hello` frames told. */
    nodes: [],
    helloSeen: false,
    /** Authenticated and resubscribed. */
    ready: false,
    nextFrameId: 1,
    /** Frame id -> {resolve, reject, timer}. */
    pending: new Map(),
    /** Reconnect attempts since the last `hello`. */
    attempt: 0,
    /** The node whose connection was lost, while reconnecting. */
    lostNode: null,
    /** Why the node closed the connection (`closing` frame), if it said. */
    closingCode: null,
    reconnectTimer: null,
    presenceTimer: null,
    roomsTimer: null,
    probeTimer: null,
    probeCount: 0,
  };

  /** What the page shows. */
  const state = {
    user: null,
    token: null,
    /** Room id -> room (see newRoom). */
    rooms: new Map(),
    /** Public rooms the user is not in: [{room, title, member_count}]. */
    publicRooms: [],
    current: null,
    /** Posts not acknowledged yet: [{room, body, cid, inFlight}]. */
    outbox: [],
    editingId: null,
    pickerFor: null,
    confirmRedact: null,
    /** The room we told the node we are typing in, and when. */
    typingRoom: null,
    typingSentAt: 0,
    cidCounter: 0,
  };

  /** DOM elements by id, looked up once. */
  const ui = {};
  /** Message id -> {el, key} for the room on view. */
  const messageEls = new Map();
  /** Element id -> what it was last rendered from (see renderIfChanged). */
  const renderedKeys = new Map();
  let renderQueued = false;
  let forceScrollToBottom = false;
  let bannerTimer = null;
  let errorTimer = null;
  /** Set when the page is being left: its last visibility change is no news. */
  let unloading = false;

  // ---- small helpers -----------------------------------------------------------------------

  /** An element with attributes and children; strings become text nodes, never HTML. */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function comparePositions(a, b) {
    return a.wall_ms - b.wall_ms || a.logical - b.logical || a.replica - b.replica || a.counter - b.counter;
  }

  function bumpVersionVector(vv, position) {
    const replica = String(position.replica);
    if (!(vv[replica] >= position.counter)) vv[replica] = position.counter;
  }

  function mergeVersionVector(vv, other) {
    for (const [replica, counter] of Object.entries(other || {})) {
      if (!(vv[replica] >= counter)) vv[replica] = counter;
    }
  }

  function formatTime(wallMs) {
    const date = new Date(wallMs);
    const today = new Date().toDateString() === date.toDateString();
    const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return today ? time : `${date.toLocaleDateString()} ${time}`;
  }

  function wsScheme() {
    return location.protocol === "https:" ? "wss:" : "ws:";
  }

  function wsUrlOf(httpAddr) {
    return `${wsScheme()}//${httpAddr}/ws`;
  }

  function nodeOfUrl(url) {
    const known = conn.nodes.find((n) => wsUrlOf(n.http_addr) === url);
    if (known) return known.node;
    return url === conn.homeUrl ? conn.node : null;
  }

  function nodeName(node) {
    return node === null || node === undefined ? "the node" : `node ${node}`;
  }

  function errorText(error) {
    return `${error.code}: ${error.message}`;
  }

  function newRoom(id) {
    return {
      id,
      title: "",
      topic: "",
      role: null,
      memberCount: 0,
      unread: 0,
      vv: {},
      messages: new Map(),
      /** Oldest position shown; older messages wait for "load older". */
      floor: null,
      /** Whether history has nothing older than what is shown. */
      complete: false,
      historyLoaded: false,
      loadingOlder: false,
      /** User -> role, from get_room and membership events (null until loaded). */
      members: null,
      banned: [],
      presence: {},
      typing: [],
      /** The open subscription's id (the id of its subscribe frame). */
      sub: null,
      caughtUp: false,
      caughtUpOnce: false,
      markedRead: null,
      markReadTimer: null,
      resubscribeTimer: null,
      resubscribeFailures: 0,
    };
  }

  function roomOf(id) {
    let room = state.rooms.get(id);
    if (!room) {
      room = newRoom(id);
      state.rooms.set(id, room);
    }
    return room;
  }

  function currentRoom() {
    return state.current ? state.rooms.get(state.current) || null : null;
  }

  function isViewing(room) {
    return state.current === room.id && document.visibilityState === "visible";
  }

  function newestPosition(room) {
    let newest = null;
    for (const message of room.messages.values()) {
      if (message.position && (!newest || comparePositions(message.position, newest) > 0)) newest = message.position;
    }
    return newest;
  }

  function rankOf(role) {
    return ROLE_RANK[role] || 0;
  }

  // ---- the connection ----------------------------------------------------------------------

  function connect() {
    clearTimeout(conn.reconnectTimer);
    conn.reconnectTimer = null;
    const candidates = candidateUrls();
    const url = candidates[conn.attempt % candidates.length];
    openSocket(url);
  }

  /** The node connected to last, then every other node the `hello` frames named. */
  function candidateUrls() {
    const first = conn.homeUrl || wsUrlOf(location.host);
    const others = conn.nodes.map((n) => wsUrlOf(n.http_addr)).filter((url) => url !== first);
    return [first, ...others];
  }

  function openSocket(url) {
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      console.warn("palaver: cannot open", url, e);
      scheduleReconnect();
      return;
    }
    conn.ws = ws;
    conn.url = url;
    conn.helloSeen = false;
    conn.closingCode = null;
    const connectTimer = setTimeout(() => {
      if (conn.ws === ws && !conn.helloSeen) ws.close();
    }, CONNECT_TIMEOUT_MS);
    ws.addEventListener("message", (event) => {
      if (conn.ws === ws) onFrame(event.data);
    });
    ws.addEventListener("close", () => {
      clearTimeout(connectTimer);
      if (conn.ws === ws) onSocketClosed();
    });
  }

  function onSocketClosed() {
    const wasUp = conn.helloSeen;
    conn.ws = null;
    conn.ready = false;
    for (const [, call] of conn.pending) {
      clearTimeout(call.timer);
      call.reject({ code: "unavailable", message: "the connection was lost", retryable: true });
    }
    conn.pending.clear();
    for (const room of state.rooms.values()) {
      room.sub = null;
      room.caughtUp = false;
      clearTimeout(room.resubscribeTimer);
    }
    clearInterval(conn.presenceTimer);
    clearInterval(conn.roomsTimer);
    clearTimeout(conn.probeTimer);
    if (wasUp && conn.lostNode === null) conn.lostNode = conn.node;
    if (wasUp) conn.attempt = 0;
    else conn.attempt += 1;
    scheduleReconnect();
    scheduleRender();
  }

  function scheduleReconnect() {
    const candidates = candidateUrls();
    const next = candidates[conn.attempt % candidates.length];
    const base = Math.min(BACKOFF_MS_MAX, BACKOFF_MS_MIN * 2 ** Math.min(conn.attempt, 10));
    const delay = base / 2 + (Math.random() * base) / 2;
    const lost = conn.lostNode !== null ? `Connection to ${nodeName(conn.lostNode)} lost` : "Not connected";
    const why = conn.closingCode ? ` (${conn.closingCode})` : "";
    showBanner(`${lost}${why} — reconnecting to ${nodeName(nodeOfUrl(next))}…`, "lost");
    clearTimeout(conn.reconnectTimer);
    conn.reconnectTimer = setTimeout(connect, delay);
  }

  function send(frame) {
    if (!conn.ws || conn.ws.readyState !== WebSocket.OPEN) return false;
    conn.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Send `op`; the promise settles with the reply's result or the error object. */
  function call(op, args, id = conn.nextFrameId++) {
    return new Promise((resolve, reject) => {
      const frame = args === undefined ? { id, op } : { id, op, args };
      if (!send(frame)) {
        reject({ code: "unavailable", message: "not connected", retryable: true });
        return;
      }
      const timer = setTimeout(() => {
        conn.pending.delete(id);
        reject({ code: "timeout", message: `no answer to ${op} within ${CALL_TIMEOUT_MS / 1000} s`, retryable: true });
      }, CALL_TIMEOUT_MS);
      conn.pending.set(id, { resolve, reject, timer });
    });
  }

  function onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (e) {
      console.warn("palaver: a frame that is not JSON", e);
      return;
    }
    switch (frame.type) {
      case "hello":
        onHello(frame);
        break;
      case "reply":
      case "error":
        onAnswer(frame);
        break;
      case "event":
        onEvent(frame);
        break;
      case "ended":
        onEnded(frame);
        break;
      case "closing":
        conn.closingCode = frame.error ? frame.error.code : null;
        break;
      default:
        console.warn("palaver: unknown frame type", frame.type);
    }
  }

  function onAnswer(frame) {
    const pending = frame.id === null || frame.id === undefined ? null : conn.pending.get(frame.id);
    if (!pending) {
      if (frame.type === "error") showError(frame.error);
      return;
    }
    conn.pending.delete(frame.id);
    clearTimeout(pending.timer);
    if (frame.type === "reply") pending.resolve(frame.result);
    else pending.reject(frame.error);
  }

  function onHello(frame) {
    conn.helloSeen = true;
    conn.node = frame.node;
    conn.homeUrl = conn.url;
    conn.attempt = 0;
    mergeNodes(frame.nodes);
    scheduleProbe();
    if (state.token) {
      resume();
    } else {
      showView("login");
      connectedBanner();
    }
    scheduleRender();
  }

  function mergeNodes(nodes) {
    for (const { node, http_addr: httpAddr } of nodes || []) {
      const known = conn.nodes.find((n) => n.node === node);
      if (known) known.http_addr = httpAddr;
      else conn.nodes.push({ node, http_addr: httpAddr });
    }
    conn.nodes.sort((a, b) => a.node - b.node);
  }

  /**
   * A node names only the nodes whose addresses it has learnt when the socket opens; ask again
   * now and then (a short-lived socket that reads the `hello` frame and closes) so that a
   * failover finds every node.
   */
  function scheduleProbe() {
    clearTimeout(conn.probeTimer);
    const delay = NODES_PROBE_MS[Math.min(conn.probeCount, NODES_PROBE_MS.length - 1)];
    conn.probeTimer = setTimeout(probeNodes, delay);
  }

  function probeNodes() {
    conn.probeCount += 1;
    if (!conn.homeUrl || !conn.helloSeen) return;
    let probe;
    try {
      probe = new WebSocket(conn.homeUrl);
    } catch (e) {
      return;
    }
    const timer = setTimeout(() => probe.close(), CONNECT_TIMEOUT_MS);
    probe.addEventListener("message", (event) => {
      try {
        const frame = JSON.parse(event.data);
        if (frame.type === "hello") mergeNodes(frame.nodes);
      } catch (e) {
        // Not a frame of ours: ignore.
      }
      clearTimeout(timer);
      probe.close();
      scheduleRender();
    });
    scheduleProbe();
  }

  /** After (re)connecting with a token: authenticate, resubscribe from the kept vectors. */
  async function resume() {
    const ws = conn.ws;
    try {
      await call("authenticate", { token: state.token });
    } catch (error) {
      if (error.code === "unauthenticated") logout("Your session expired: log in again.");
      else console.warn("palaver: authenticate failed", error);
      return;
    }
    showView("chat");
    await refreshRooms();
    await Promise.all([...state.rooms.values()].filter((r) => r.role).map((room) => subscribe(room)));
    if (conn.ws !== ws) return; // lost again meanwhile: the next connection resumes
    conn.ready = true;
    for (const room of state.rooms.values()) if (room.role && room.sub === null) resubscribeLater(room);
    sendPresence();
    clearInterval(conn.presenceTimer);
    conn.presenceTimer = setInterval(sendPresence, PRESENCE_RENEW_MS);
    clearInterval(conn.roomsTimer);
    conn.roomsTimer = setInterval(refreshRoomsAndSubscribe, ROOMS_REFRESH_MS);
    for (const item of state.outbox) if (!item.messageId) deliver(item);
    const room = currentRoom();
    if (room) openRoomData(room);
    connectedBanner();
    scheduleRender();
  }

  function connectedBanner() {
    if (conn.lostNode === null) {
      hideBanner();
      return;
    }
    conn.lostNode = null;
    showBanner(`Connected to ${nodeName(conn.node)}`, "ok", BANNER_CONNECTED_MS);
  }

  // ---- rooms and subscriptions -------------------------------------------------------------

  async function refreshRooms() {
    let list;
    try {
      list = await call("list_rooms");
    } catch (error) {
      handleError(error);
      return;
    }
    state.publicRooms = [];
    for (const summary of list.rooms) {
      if (!summary.my_role) {
        const held = state.rooms.get(summary.room);
        if (held && held.role) held.role = null;
        state.publicRooms.push(summary);
        continue;
      }
      const known = state.rooms.has(summary.room);
      const room = roomOf(summary.room);
      room.title = summary.title;
      room.topic = summary.topic;
      room.role = summary.my_role;
      room.memberCount = summary.member_count;
      // Counts of rooms already followed are kept live here; the node's count is the start.
      if (!known || !room.caughtUpOnce) room.unread = isViewing(room) ? 0 : summary.unread_count;
    }
    if (!state.current) {
      const remembered = sessionStorage.getItem(STORAGE_ROOM);
      const first = [...state.rooms.values()].find((r) => r.role);
      if (remembered && state.rooms.get(remembered)?.role) viewRoom(remembered);
      else if (first) viewRoom(first.id);
    }
    scheduleRender();
  }

  async function refreshRoomsAndSubscribe() {
    await refreshRooms();
    const fresh = [...state.rooms.values()].filter((r) => r.role && r.sub === null);
    await Promise.all(fresh.map((room) => subscribe(room)));
    if (fresh.length) sendPresence();
  }

  async function subscribe(room) {
    clearTimeout(room.resubscribeTimer);
    const id = conn.nextFrameId++;
    room.sub = id;
    room.caughtUp = false;
    const args = { room: room.id };
    if (Object.keys(room.vv).length) args.version_vector = { ...room.vv };
    try {
      await call("subscribe", args, id);
    } catch (error) {
      if (room.sub === id) room.sub = null;
      if (error.code === "not_member" || error.code === "room_not_found") {
        room.role = null;
      } else if (error.retryable && conn.ready) {
        resubscribeLater(room);
      } else if (!error.retryable) {
        handleError(error);
      }
      scheduleRender();
    }
  }

  /** Subscribe again after a retryable failure, backing off while failures repeat. */
  function resubscribeLater(room) {
    clearTimeout(room.resubscribeTimer);
    const delay = Math.min(RESUBSCRIBE_MS_MAX, RESUBSCRIBE_MS_MIN * 2 ** Math.min(room.resubscribeFailures, 10));
    room.resubscribeFailures += 1;
    room.resubscribeTimer = setTimeout(() => {
      if (conn.ready && room.role && room.sub === null) subscribe(room);
    }, delay);
  }

  function onEnded(frame) {
    const room = state.rooms.get(frame.room);
    if (!room || room.sub !== frame.sub) return;
    room.sub = null;
    room.caughtUp = false;
    if (frame.error && frame.error.retryable) {
      resubscribeLater(room);
    } else {
      room.role = null;
      room.members = null;
      if (frame.error && frame.error.code !== "not_member") showError(frame.error);
    }
    scheduleRender();
  }

  function onEvent(frame) {
    const room = state.rooms.get(frame.room);
    if (!room || room.sub !== frame.sub) return;
    const event = frame.event;
    switch (event.kind) {
      case "message":
        onMessageEvent(room, event);
        break;
      case "membership":
        onMembershipEvent(room, event);
        break;
      case "state":
        room.presence = event.presence || {};
        room.typing = event.typing || [];
        break;
      case "caught_up":
        mergeVersionVector(room.vv, event.version_vector);
        room.caughtUp = true;
        room.caughtUpOnce = true;
        room.resubscribeFailures = 0;
        if (isViewing(room)) markReadSoon(room);
        break;
      default:
        break;
    }
    scheduleRender();
  }

  function onMessageEvent(room, event) {
    if (event.position) bumpVersionVector(room.vv, event.position);
    const message = event.message;
    if (!message) return; // its post has not arrived yet
    const isNew = !room.messages.has(message.message_id);
    room.messages.set(message.message_id, message);
    for (const item of state.outbox) if (item.messageId === message.message_id) dropFromOutbox(item);
    if (event.change !== "posted" || !isNew) return;
    // The backlog of a first subscription is history (the node's unread count covers it);
    // after that every post is news.
    const news = room.caughtUp || room.caughtUpOnce;
    if (isViewing(room)) markReadSoon(room);
    else if (news && event.actor !== state.user) room.unread += 1;
  }

  function onMembershipEvent(room, event) {
    const me = event.user === state.user;
    switch (event.change) {
      case "joined":
      case "role":
        if (room.members) room.members.set(event.user, event.role);
        if (me) room.role = event.role;
        break;
      case "left":
      case "kicked":
      case "banned":
        if (room.members) room.members.delete(event.user);
        if (me) {
          room.role = null;
          if (event.change !== "left") {
            showError({ code: event.change, message: `${event.actor} ${event.change === "banned" ? "banned" : "removed"} you from ${room.id}` });
          }
        } else if (event.change === "banned" && rankOf(room.role) >= ROLE_RANK.admin) {
          refreshRoom(room);
        }
        break;
      case "deleted":
        room.role = null;
        state.rooms.delete(room.id);
        if (state.current === room.id) state.current = null;
        break;
      case "settings":
      case "unbanned":
        refreshRoom(room);
        break;
      default:
        break;
    }
  }

  /** Title, topic, members and bans of `room` (get_room). */
  async function refreshRoom(room) {
    try {
      const info = await call("get_room", { room: room.id });
      room.title = info.title;
      room.topic = info.topic;
      room.members = new Map(info.members.map((m) => [m.user, m.role]));
      room.memberCount = info.members.length;
      room.banned = info.banned || [];
      const mine = room.members.get(state.user);
      if (mine) room.role = mine;
    } catch (error) {
      if (error.code !== "unavailable") handleError(error);
    }
    scheduleRender();
  }

  /** What the room on view needs from the node: its newest history page and its members. */
  function openRoomData(room) {
    if (!room.historyLoaded) loadNewest(room);
    refreshRoom(room);
  }

  async function loadNewest(room) {
    try {
      const page = await call("history", { room: room.id, limit: HISTORY_PAGE_MESSAGES });
      room.historyLoaded = true;
      addHistory(room, page);
      forceScrollToBottom = true;
    } catch (error) {
      if (error.code !== "unavailable") handleError(error);
    }
    scheduleRender();
  }

  async function loadOlder(room) {
    if (room.loadingOlder || room.complete) return;
    const visible = visibleMessages(room);
    if (!visible.length) return;
    room.loadingOlder = true;
    scheduleRender();
    const before = visible[0].position;
    try {
      const page = await call("history", { room: room.id, limit: HISTORY_PAGE_MESSAGES, before });
      const scroller = ui["message-scroller"];
      const fromBottom = scroller.scrollHeight - scroller.scrollTop;
      addHistory(room, page);
      renderNow();
      scroller.scrollTop = scroller.scrollHeight - fromBottom;
    } catch (error) {
      handleError(error);
    } finally {
      room.loadingOlder = false;
      scheduleRender();
    }
  }

  /** A page of history (newest first): shown from its oldest message on. */
  function addHistory(room, page) {
    for (const message of page.messages) {
      // What the subscription delivered is at least as new as a history page.
      if (!room.messages.has(message.message_id)) room.messages.set(message.message_id, message);
    }
    const oldest = page.messages.reduce(
      (min, m) => (!min || comparePositions(m.position, min) < 0 ? m.position : min),
      null,
    );
    if (oldest && (!room.floor || comparePositions(oldest, room.floor) < 0)) room.floor = oldest;
    if (!page.more) room.complete = true;
  }

  /** The messages shown: oldest first, from the floor on. */
  function visibleMessages(room) {
    const all = [...room.messages.values()].filter((m) => m.position);
    all.sort((a, b) => comparePositions(a.position, b.position));
    if (room.complete) return all;
    if (room.floor) return all.filter((m) => comparePositions(m.position, room.floor) >= 0);
    return all.slice(-HISTORY_PAGE_MESSAGES);
  }

  function viewRoom(id) {
    if (state.typingRoom && state.typingRoom !== id) sendTyping(false);
    const leaving = currentRoom();
    if (leaving && leaving.id !== id && leaving.markReadTimer) {
      // What was on view was read, however soon the user moved on.
      clearTimeout(leaving.markReadTimer);
      markRead(leaving, true);
    }
    state.current = id;
    state.editingId = null;
    state.pickerFor = null;
    state.confirmRedact = null;
    sessionStorage.setItem(STORAGE_ROOM, id);
    messageEls.clear();
    ui["message-list"].replaceChildren();
    const room = roomOf(id);
    room.unread = 0;
    forceScrollToBottom = true;
    if (conn.ready) openRoomData(room);
    markReadSoon(room);
    scheduleRender();
  }

  function markReadSoon(room) {
    clearTimeout(room.markReadTimer);
    room.markReadTimer = setTimeout(() => markRead(room, false), MARK_READ_DELAY_MS);
  }

  /** Move the read marker to the newest message held (`leaving`: the room was just on view). */
  async function markRead(room, leaving) {
    room.markReadTimer = null;
    if (!(leaving || isViewing(room)) || !conn.ready) return;
    room.unread = 0;
    const newest = newestPosition(room);
    if (!newest || (room.markedRead && comparePositions(newest, room.markedRead) <= 0)) return;
    room.markedRead = newest;
    try {
      await call("mark_read", { room: room.id, position: newest });
    } catch (error) {
      room.markedRead = null;
    }
    scheduleRender();
  }

  // ---- actions -----------------------------------------------------------------------------

  async function login(register) {
    const user = ui["login-user"].value.trim();
    const password = ui["login-password"].value;
    showLoginError(null);
    try {
      if (register) await call("register", { user, password });
      const done = await call("login", { user, password });
      state.user = done.user;
      state.token = done.token;
      sessionStorage.setItem(STORAGE_USER, done.user);
      sessionStorage.setItem(STORAGE_TOKEN, done.token);
      ui["login-password"].value = "";
      await resume();
    } catch (error) {
      showLoginError(error);
    }
  }

  function logout(why) {
    sessionStorage.removeItem(STORAGE_TOKEN);
    sessionStorage.removeItem(STORAGE_USER);
    sessionStorage.removeItem(STORAGE_ROOM);
    if (why) sessionStorage.setItem("palaver.notice", why);
    location.reload();
  }

  async function createRoom() {
    const id = ui["create-room-id"].value.trim();
    const title = ui["create-room-title"].value.trim();
    try {
      const info = await call("create_room", { room: id, title });
      ui["create-room-id"].value = "";
      ui["create-room-title"].value = "";
      await enterRoom(info.room, "owner");
    } catch (error) {
      handleError(error);
    }
  }

  async function joinRoom(id) {
    try {
      await call("join", { room: id });
      ui["join-room-id"].value = "";
      await enterRoom(id, "member");
    } catch (error) {
      handleError(error);
    }
  }

  /** After creating or joining: follow the room and show it. */
  async function enterRoom(id, role) {
    const room = roomOf(id);
    room.role = room.role || role;
    state.publicRooms = state.publicRooms.filter((r) => r.room !== id);
    await subscribe(room);
    sendPresence();
    viewRoom(id);
    refreshRooms();
  }

  async function leaveRoom(room) {
    try {
      await call("leave", { room: room.id });
      room.role = null;
      state.current = null;
      sessionStorage.removeItem(STORAGE_ROOM);
      await refreshRooms();
    } catch (error) {
      handleError(error);
    }
    scheduleRender();
  }

  function newClientMessageId() {
    state.cidCounter += 1;
    const random = Math.random().toString(36).slice(2, 8);
    return `${state.user}-${Date.now()}-${state.cidCounter}-${random}`.slice(0, 64);
  }

  function sendMessage() {
    const room = currentRoom();
    const body = ui["composer-input"].value;
    if (!room || !body.trim()) return;
    ui["composer-input"].value = "";
    sendTyping(false);
    const item = { room: room.id, body, cid: newClientMessageId(), seen: newestPosition(room), inFlight: false };
    state.outbox.push(item);
    forceScrollToBottom = true;
    deliver(item);
    scheduleRender();
  }

  async function deliver(item) {
    if (item.inFlight || !conn.ready) return;
    item.inFlight = true;
    const args = { room: item.room, body: item.body, client_message_id: item.cid };
    if (item.seen) args.seen = item.seen;
    try {
      const done = await call("post", args);
      // Shown as pending until the subscription delivers it (or a while, should it not).
      item.messageId = done.message_id;
      const room = state.rooms.get(item.room);
      if (room && room.messages.has(done.message_id)) dropFromOutbox(item);
      else setTimeout(() => dropFromOutbox(item), PENDING_AFTER_ACK_MS);
    } catch (error) {
      if (error.code === "rate_limited") {
        setTimeout(() => deliver(item), error.retry_after_ms || 1000);
      } else if (error.retryable) {
        // Retried on the next connection (or now, if the socket is still up).
        if (conn.ready) setTimeout(() => deliver(item), 1000);
      } else {
        dropFromOutbox(item);
        handleError(error);
      }
    } finally {
      item.inFlight = false;
      scheduleRender();
    }
  }

  function dropFromOutbox(item) {
    const before = state.outbox.length;
    state.outbox = state.outbox.filter((i) => i !== item);
    if (state.outbox.length !== before) scheduleRender();
  }

  function sendTyping(typing) {
    const room = typing ? currentRoom() : state.rooms.get(state.typingRoom);
    if (!room || !conn.ready) return;
    if (typing) {
      state.typingRoom = room.id;
      state.typingSentAt = Date.now();
    } else {
      state.typingRoom = null;
      state.typingSentAt = 0;
    }
    call("typing", { room: room.id, typing }).catch(() => {});
  }

  function onComposerInput() {
    const text = ui["composer-input"].value;
    if (!text.trim()) {
      if (state.typingRoom) sendTyping(false);
      return;
    }
    const stale = Date.now() - state.typingSentAt > TYPING_RENEW_MS;
    if (state.typingRoom !== state.current || stale) sendTyping(true);
  }

  function sendPresence() {
    if (!conn.ready) return;
    const status = document.visibilityState === "visible" ? "online" : "away";
    const ws = conn.ws;
    call("set_presence", { status, rooms: [] }).catch((error) => {
      // No answer at all: the node or the path to it is dead though the socket looks open.
      if (error.code === "timeout" && conn.ws === ws && ws) ws.close();
    });
  }

  async function react(room, message, reaction) {
    const mine = (message.reactions || []).some((r) => r.reaction === reaction && r.users.includes(state.user));
    state.pickerFor = null;
    try {
      await call("react", { room: room.id, message_id: message.message_id, reaction, remove: mine });
    } catch (error) {
      handleError(error);
    }
    scheduleRender();
  }

  async function saveEdit(room, message, body) {
    state.editingId = null;
    scheduleRender();
    if (body === message.body || !body.trim()) return;
    try {
      await call("edit", { room: room.id, message_id: message.message_id, body });
    } catch (error) {
      handleError(error);
    }
  }

  async function redact(room, message) {
    state.confirmRedact = null;
    try {
      await call("redact", { room: room.id, message_id: message.message_id });
    } catch (error) {
      handleError(error);
    }
    scheduleRender();
  }

  async function memberAction(room, op, user, role) {
    const args = { room: room.id, user };
    if (op === "set_role") args.role = role;
    try {
      await call(op, args);
    } catch (error) {
      handleError(error);
    }
    refreshRoom(room);
  }

  // ---- errors and banners ------------------------------------------------------------------

  function handleError(error) {
    if (error.code === "unauthenticated" && state.token) {
      logout("Your session expired: log in again.");
      return;
    }
    showError(error);
  }

  function showError(error) {
    ui["error-text"].textContent = errorText(error);
    ui["error-bar"].hidden = false;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => {
      ui["error-bar"].hidden = true;
    }, ERROR_SHOWN_MS);
  }

  function showLoginError(error) {
    ui["login-error"].hidden = !error;
    ui["login-error"].textContent = error ? errorText(error) : "";
    if (error) ui["login-error"].dataset.code = error.code;
    else delete ui["login-error"].dataset.code;
  }

  function showBanner(text, kind, hideAfterMs) {
    const banner = ui["connection-banner"];
    banner.textContent = text;
    banner.className = `banner ${kind}`;
    banner.dataset.state = kind;
    banner.hidden = false;
    clearTimeout(bannerTimer);
    if (hideAfterMs) bannerTimer = setTimeout(hideBanner, hideAfterMs);
  }

  function hideBanner() {
    clearTimeout(bannerTimer);
    ui["connection-banner"].hidden = true;
  }

  function showView(which) {
    ui["login-view"].hidden = which !== "login";
    ui["chat-view"].hidden = which !== "chat";
    ui.logout.hidden = which !== "chat";
    if (which === "login") {
      const notice = sessionStorage.getItem("palaver.notice");
      if (notice) {
        sessionStorage.removeItem("palaver.notice");
        showLoginError({ code: "unauthenticated", message: notice });
      }
    }
  }

  // ---- rendering ---------------------------------------------------------------------------

  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    setTimeout(renderNow, 0);
  }

  function renderNow() {
    renderQueued = false;
    renderHeader();
    renderRoomList();
    renderRoom();
  }

  function renderHeader() {
    ui.whoami.textContent = state.user ? state.user : "";
    const status = ui["connection-status"];
    const up = conn.helloSeen && conn.ws !== null;
    status.textContent = up ? `● ${nodeName(conn.node)}` : "○ offline";
    status.className = up ? "status up" : "status down";
    status.dataset.node = up ? String(conn.node) : "";
    status.dataset.ready = conn.ready ? "true" : "false";
    status.dataset.nodes = conn.nodes.map((n) => n.node).join(",");
    status.title = conn.nodes.map((n) => `node ${n.node}: ${n.http_addr}`).join("\n");
  }

  /**
   * Run `render` only if `key` (JSON of what it shows) changed since the last time for `id`:
   * lists are rebuilt whole, and rebuilding one under the pointer would close an open <select>
   * or lose focus at every state event.
   */
  function renderIfChanged(id, key, render) {
    const json = JSON.stringify(key);
    if (renderedKeys.get(id) === json) return;
    renderedKeys.set(id, json);
    render();
  }

  function renderRoomList() {
    const mine = [...state.rooms.values()].filter((r) => r.role).sort((a, b) => a.id.localeCompare(b.id));
    const others = state.publicRooms.filter((r) => !state.rooms.get(r.room)?.role);
    const key = [state.current, mine.map((r) => [r.id, r.title, r.unread]), others];
    renderIfChanged("room-list", key, () => renderRoomEntries(mine, others));
  }

  function renderRoomEntries(mine, others) {
    ui["room-list"].replaceChildren(
      ...mine.map((room) => {
        const unread = room.unread > 0 ? el("span", { className: "unread", "data-testid": "unread-count", text: String(room.unread) }) : null;
        const button = el(
          "button",
          {
            type: "button",
            className: room.id === state.current ? "room active" : "room",
            "data-testid": "room-entry",
            "data-room": room.id,
            "data-unread": String(room.unread),
            "aria-current": room.id === state.current ? "true" : null,
          },
          el("span", { className: "room-name", text: `# ${room.id}` }),
          room.title && room.title !== room.id ? el("span", { className: "room-title", text: room.title }) : null,
          unread,
        );
        return el("li", {}, button);
      }),
    );
    ui["room-list-empty"].hidden = mine.length > 0;
    ui["public-rooms-heading"].hidden = others.length === 0;
    ui["public-room-list"].replaceChildren(
      ...others.map((summary) =>
        el(
          "li",
          { className: "public-room", "data-testid": "public-room", "data-room": summary.room },
          el("span", { className: "room-name", text: `# ${summary.room}` }),
          el("span", { className: "count", text: `${summary.member_count}` }),
          el("button", { type: "button", className: "small secondary", "data-action": "join", "data-room": summary.room, text: "Join" }),
        ),
      ),
    );
  }

  function renderRoom() {
    const room = currentRoom();
    const member = Boolean(room && room.role);
    ui["composer-input"].disabled = !member;
    ui["composer-send"].disabled = !member;
    ui["leave-room"].hidden = !member;
    if (!room) {
      ui["room-title"].textContent = "No room selected";
      ui["room-topic"].textContent = "";
      ui["message-list"].replaceChildren();
      ui["pending-list"].replaceChildren();
      ui["member-list"].replaceChildren();
      renderedKeys.delete("member-list");
      ui["typing-indicator"].textContent = "";
      ui["load-older"].hidden = true;
      ui["history-start"].hidden = true;
      ui["banned-section"].hidden = true;
      return;
    }
    ui["room-title"].textContent = room.title ? `${room.title} (#${room.id})` : `# ${room.id}`;
    ui["room-topic"].textContent = member ? room.topic : "You are not a member of this room.";
    const scroller = ui["message-scroller"];
    const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48;
    renderMessages(room);
    renderPending(room);
    renderMembers(room);
    renderTyping(room);
    ui["load-older"].hidden = room.complete || !room.historyLoaded;
    ui["load-older"].disabled = room.loadingOlder;
    ui["load-older"].textContent = room.loadingOlder ? "Loading…" : "Load older messages";
    ui["history-start"].hidden = !room.complete;
    if (atBottom || forceScrollToBottom) scroller.scrollTop = scroller.scrollHeight;
    forceScrollToBottom = false;
  }

  function messageKey(room, message) {
    return JSON.stringify([
      message.body,
      message.edited,
      message.redacted,
      message.reactions,
      room.role,
      state.editingId === message.message_id,
      state.pickerFor === message.message_id,
      state.confirmRedact === message.message_id,
    ]);
  }

  /** Keyed update: one element per message id, rebuilt only when what it shows changed. */
  function renderMessages(room) {
    const list = ui["message-list"];
    const visible = visibleMessages(room);
    const wanted = new Set();
    let previous = null;
    for (const message of visible) {
      const id = message.message_id;
      wanted.add(id);
      const key = messageKey(room, message);
      let entry = messageEls.get(id);
      if (!entry || entry.key !== key) {
        const fresh = buildMessage(room, message);
        if (entry) entry.el.replaceWith(fresh);
        entry = { el: fresh, key };
        messageEls.set(id, entry);
      }
      const expected = previous ? previous.nextSibling : list.firstChild;
      if (expected !== entry.el) list.insertBefore(entry.el, expected);
      previous = entry.el;
    }
    for (const [id, entry] of messageEls) {
      if (!wanted.has(id)) {
        entry.el.remove();
        messageEls.delete(id);
      }
    }
  }

  function buildMessage(room, message) {
    const mine = message.author === state.user;
    const canRedact = mine || rankOf(room.role) >= ROLE_RANK.admin;
    const item = el("li", {
      className: `message${mine ? " mine" : ""}${message.redacted ? " redacted" : ""}`,
      "data-testid": "message",
      "data-message-id": message.message_id,
      "data-author": message.author,
    });
    item.append(
      el(
        "div",
        { className: "meta" },
        el("span", { className: "author", "data-testid": "message-author", text: message.author }),
        el("time", {
          datetime: new Date(message.position.wall_ms).toISOString(),
          title: new Date(message.position.wall_ms).toLocaleString(),
          text: formatTime(message.position.wall_ms),
        }),
        message.edited && !message.redacted ? el("span", { className: "edited", "data-testid": "message-edited", text: "(edited)" }) : null,
      ),
    );
    if (message.redacted) {
      item.append(el("div", { className: "body deleted", "data-testid": "message-body", text: "message deleted" }));
      return item;
    }
    if (state.editingId === message.message_id) {
      item.append(buildEditor(message));
    } else {
      item.append(el("div", { className: "body", "data-testid": "message-body", text: message.body }));
    }
    const reactions = (message.reactions || []).filter((r) => r.users.length);
    if (reactions.length) {
      item.append(
        el(
          "div",
          { className: "reactions" },
          ...reactions.map((r) =>
            el("button", {
              type: "button",
              className: r.users.includes(state.user) ? "reaction mine" : "reaction",
              "data-action": "react",
              "data-reaction": r.reaction,
              "data-testid": "reaction",
              title: r.users.join(", "),
              text: `${r.reaction} ${r.users.length}`,
            }),
          ),
        ),
      );
    }
    const actions = el("div", { className: "actions" });
    if (room.role) {
      actions.append(el("button", { type: "button", className: "link", "data-action": "picker", title: "React", text: "☺+" }));
    }
    if (mine && room.role) actions.append(el("button", { type: "button", className: "link", "data-action": "edit", text: "Edit" }));
    if (canRedact && room.role) {
      const confirming = state.confirmRedact === message.message_id;
      actions.append(
        el("button", {
          type: "button",
          className: confirming ? "link danger" : "link",
          "data-action": confirming ? "redact" : "confirm-redact",
          text: confirming ? "Really delete?" : "Delete",
        }),
      );
    }
    item.append(actions);
    if (state.pickerFor === message.message_id) {
      item.append(
        el(
          "div",
          { className: "picker", "data-testid": "reaction-picker" },
          ...REACTIONS.map((reaction) => el("button", { type: "button", "data-action": "react", "data-reaction": reaction, text: reaction })),
        ),
      );
    }
    return item;
  }

  function buildEditor(message) {
    const input = el("textarea", { className: "edit-input", "data-testid": "edit-input", rows: "2", "aria-label": "Edit message" });
    input.value = message.body;
    setTimeout(() => input.focus(), 0);
    return el(
      "div",
      { className: "editor" },
      input,
      el(
        "div",
        { className: "row" },
        el("button", { type: "button", className: "small", "data-action": "save-edit", text: "Save" }),
        el("button", { type: "button", className: "small secondary", "data-action": "cancel-edit", text: "Cancel" }),
      ),
    );
  }

  function renderPending(room) {
    const pending = state.outbox.filter((item) => item.room === room.id);
    ui["pending-list"].replaceChildren(
      ...pending.map((item) =>
        el(
          "li",
          { className: "message pending", "data-testid": "pending-message" },
          el("div", { className: "meta" }, el("span", { className: "author", text: state.user }), el("span", { className: "sending", text: "sending…" })),
          el("div", { className: "body", text: item.body }),
        ),
      ),
    );
  }

  function renderMembers(room) {
    const members = room.members ? [...room.members.entries()] : [];
    members.sort((a, b) => rankOf(b[1]) - rankOf(a[1]) || a[0].localeCompare(b[0]));
    const presence = members.map(([user]) => room.presence[user] || "offline");
    const key = [room.id, room.role, members, presence, room.banned];
    renderIfChanged("member-list", key, () => renderMemberEntries(room, members));
  }

  function renderMemberEntries(room, members) {
    const myRank = rankOf(room.role);
    ui["member-list"].replaceChildren(
      ...members.map(([user, role]) => {
        const presence = room.presence[user] || "offline";
        const item = el(
          "li",
          { className: "member", "data-testid": "member", "data-user": user, "data-role": role, "data-presence": presence },
          el("span", { className: `dot ${presence}`, "data-testid": "presence-dot", title: presence, "aria-label": presence }),
          el("span", { className: "name", text: user }),
          role !== "member" ? el("span", { className: `badge ${role}`, text: role }) : null,
        );
        if (user !== state.user && myRank >= ROLE_RANK.admin) {
          const actions = el("span", { className: "member-actions" });
          if (myRank > rankOf(role)) {
            actions.append(
              el("button", { type: "button", className: "link", "data-action": "kick", "data-user": user, text: "Kick" }),
              el("button", { type: "button", className: "link danger", "data-action": "ban", "data-user": user, text: "Ban" }),
            );
          }
          if (room.role === "owner") {
            const select = el("select", { "data-action": "set-role", "data-user": user, "aria-label": `Role of ${user}` });
            for (const choice of ["member", "admin", "owner"]) {
              select.append(el("option", { value: choice, selected: choice === role, text: choice }));
            }
            actions.append(select);
          }
          if (actions.childElementCount) item.append(actions);
        }
        return item;
      }),
    );
    const showBanned = myRank >= ROLE_RANK.admin && room.banned.length > 0;
    ui["banned-section"].hidden = !showBanned;
    ui["banned-list"].replaceChildren(
      ...(showBanned ? room.banned : []).map((user) =>
        el(
          "li",
          { className: "member", "data-user": user },
          el("span", { className: "name", text: user }),
          el("button", { type: "button", className: "link", "data-action": "unban", "data-user": user, text: "Unban" }),
        ),
      ),
    );
  }

  function renderTyping(room) {
    const typing = room.typing.filter((user) => user !== state.user);
    let text = "";
    if (typing.length === 1) text = `${typing[0]} is typing…`;
    else if (typing.length === 2) text = `${typing[0]} and ${typing[1]} are typing…`;
    else if (typing.length > 2) text = "Several people are typing…";
    ui["typing-indicator"].textContent = text;
    ui["typing-indicator"].dataset.users = typing.join(",");
  }

  // ---- wiring ------------------------------------------------------------------------------

  function onMessageListClick(event) {
    const target = event.target.closest("[data-action]");
    const item = event.target.closest("[data-message-id]");
    const room = currentRoom();
    if (!target || !item || !room) return;
    const message = room.messages.get(item.dataset.messageId);
    if (!message) return;
    switch (target.dataset.action) {
      case "react":
        react(room, message, target.dataset.reaction);
        break;
      case "picker":
        state.pickerFor = state.pickerFor === message.message_id ? null : message.message_id;
        break;
      case "edit":
        state.editingId = message.message_id;
        break;
      case "cancel-edit":
        state.editingId = null;
        break;
      case "save-edit":
        saveEdit(room, message, item.querySelector(".edit-input").value);
        break;
      case "confirm-redact":
        state.confirmRedact = message.message_id;
        break;
      case "redact":
        redact(room, message);
        break;
      default:
        break;
    }
    scheduleRender();
  }

  function onMessageListKey(event) {
    if (!event.target.classList.contains("edit-input")) return;
    const item = event.target.closest("[data-message-id]");
    const room = currentRoom();
    const message = room && item ? room.messages.get(item.dataset.messageId) : null;
    if (!message) return;
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      saveEdit(room, message, event.target.value);
    } else if (event.key === "Escape") {
      state.editingId = null;
      scheduleRender();
    }
  }

  function onMemberAction(event) {
    const target = event.target.closest("[data-action]");
    const room = currentRoom();
    if (!target || !room || target.tagName === "SELECT") return;
    const action = { kick: "kick", ban: "ban", unban: "unban" }[target.dataset.action];
    if (action) memberAction(room, action, target.dataset.user);
  }

  function onRoleChange(event) {
    const target = event.target;
    const room = currentRoom();
    if (!room || target.dataset.action !== "set-role") return;
    memberAction(room, "set_role", target.dataset.user, target.value);
  }

  function wire() {
    for (const node of document.querySelectorAll("[id]")) ui[node.id] = node;
    ui["login-form"].addEventListener("submit", (event) => {
      event.preventDefault();
      login(false);
    });
    ui["register-submit"].addEventListener("click", () => {
      if (ui["login-form"].reportValidity()) login(true);
    });
    ui.logout.addEventListener("click", () => logout(null));
    ui["error-dismiss"].addEventListener("click", () => {
      ui["error-bar"].hidden = true;
    });
    ui["create-room-form"].addEventListener("submit", (event) => {
      event.preventDefault();
      createRoom();
    });
    ui["join-room-form"].addEventListener("submit", (event) => {
      event.preventDefault();
      joinRoom(ui["join-room-id"].value.trim());
    });
    ui["room-list"].addEventListener("click", (event) => {
      const entry = event.target.closest("[data-room]");
      if (entry) viewRoom(entry.dataset.room);
    });
    ui["public-room-list"].addEventListener("click", (event) => {
      const button = event.target.closest("[data-action=join]");
      if (button) joinRoom(button.dataset.room);
    });
    ui["leave-room"].addEventListener("click", () => {
      const room = currentRoom();
      if (room) leaveRoom(room);
    });
    ui["message-list"].addEventListener("click", onMessageListClick);
    ui["message-list"].addEventListener("keydown", onMessageListKey);
    ui["member-list"].addEventListener("click", onMemberAction);
    ui["member-list"].addEventListener("change", onRoleChange);
    ui["banned-list"].addEventListener("click", onMemberAction);
    ui["load-older"].addEventListener("click", () => {
      const room = currentRoom();
      if (room) loadOlder(room);
    });
    ui["message-scroller"].addEventListener("scroll", () => {
      const room = currentRoom();
      if (room && ui["message-scroller"].scrollTop < 24 && room.historyLoaded && !room.complete) loadOlder(room);
    });
    ui.composer.addEventListener("submit", (event) => {
      event.preventDefault();
      sendMessage();
    });
    ui["composer-input"].addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        sendMessage();
      }
    });
    ui["composer-input"].addEventListener("input", onComposerInput);
    window.addEventListener("pagehide", () => {
      unloading = true;
    });
    window.addEventListener("pageshow", () => {
      unloading = false;
    });
    document.addEventListener("visibilitychange", () => {
      if (unloading) return;
      sendPresence();
      const room = currentRoom();
      if (room && isViewing(room)) {
        room.unread = 0;
        markReadSoon(room);
        scheduleRender();
      }
    });
  }

  function start() {
    wire();
    state.token = sessionStorage.getItem(STORAGE_TOKEN);
    state.user = state.token ? sessionStorage.getItem(STORAGE_USER) : null;
    showView(state.token ? "chat" : "login");
    showBanner("Connecting…", "connecting");
    connect();
    renderNow();
  }

  return { start };
})();

document.addEventListener("DOMContentLoaded", () => Palaver.start());
