// A read-only MQTT 3.1.1 client over WebSocket, for the accept-mqtt dashboard.
//
// It can CONNECT, SUBSCRIBE (QoS 0), PINGREQ and DISCONNECT, and read what the broker sends;
// it has no way to PUBLISH, so the page cannot drive a job whatever its credentials allow.
// Any MQTT 5 broker also speaks 3.1.1, and a reader needs nothing that 5 adds.
// Packet layouts: MQTT 3.1.1 (OASIS), sections 2 and 3. No dependencies.
"use strict";

class MqttSubscriber {
  // url: ws://host:port/ (the broker's websockets listener); opts: {username, password,
  // clientId, keepalive (s), topics: [filters], onMessage(topic, text, retained),
  // onState(state, detail)}. Reconnects 2 s after a lost connection.
  constructor(url, opts) {
    this.url = url;
    this.opts = Object.assign({keepalive: 30, topics: [], onMessage() {}, onState() {}}, opts);
    this.opts.clientId = this.opts.clientId ||
      "accept-dashboard-" + Math.random().toString(16).slice(2, 10);
    this.buf = new Uint8Array(0);
    this.ws = null;
    this.ping = null;
    this.closed = false;
  }

  connect() {
    this.closed = false;
    this.opts.onState("connecting", this.url);
    let ws;
    try {
      ws = new WebSocket(this.url, ["mqtt"]);
    } catch (e) {
      this.opts.onState("error", String(e));
      return;
    }
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => ws.send(this._connectPacket());
    ws.onmessage = (ev) => this._receive(new Uint8Array(ev.data));
    ws.onclose = (ev) => {
      clearInterval(this.ping);
      this.buf = new Uint8Array(0);
      if (this.closed) return;
      this.opts.onState("disconnected", ev.reason || "connection closed (code " + ev.code + ")");
      setTimeout(() => { if (!this.closed) this.connect(); }, 2000);
    };
    ws.onerror = () => {};  // onclose follows and says it
  }

  close() {
    this.closed = true;
    clearInterval(this.ping);
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(new Uint8Array([0xe0, 0]));
    if (this.ws) this.ws.close();
  }

  // -- encoding ---------------------------------------------------------------------------
  static _str(s) {
    const b = new TextEncoder().encode(s);
    return [b.length >> 8, b.length & 0xff, ...b];
  }

  static _packet(first, body) {
    const len = [];
    let n = body.length;
    do {  // remaining length: 7 bits a byte, high bit = more
      let d = n % 128;
      n = Math.floor(n / 128);
      if (n > 0) d |= 0x80;
      len.push(d);
    } while (n > 0);
    return new Uint8Array([first, ...len, ...body]);
  }

  _connectPacket() {
    const o = this.opts;
    let flags = 0x02;  // clean session: nothing is kept for us between connections
    const payload = MqttSubscriber._str(o.clientId);
    if (o.username) { flags |= 0x80; payload.push(...MqttSubscriber._str(o.username)); }
    if (o.username && o.password) { flags |= 0x40; payload.push(...MqttSubscriber._str(o.password)); }
    const body = [...MqttSubscriber._str("MQTT"), 4, flags, o.keepalive >> 8, o.keepalive & 0xff,
                  ...payload];
    return MqttSubscriber._packet(0x10, body);
  }

  _subscribePacket() {
    const body = [0, 1];  // packet id 1
    for (const t of this.opts.topics) body.push(...MqttSubscriber._str(t), 0);  // QoS 0
    return MqttSubscriber._packet(0x82, body);
  }

  // -- decoding ---------------------------------------------------------------------------
  _receive(chunk) {
    const all = new Uint8Array(this.buf.length + chunk.length);
    all.set(this.buf);
    all.set(chunk, this.buf.length);
    let pos = 0;
    for (;;) {
      let mult = 1, len = 0, i = pos + 1, done = false;
      while (i < all.length && i < pos + 5) {
        const d = all[i++];
        len += (d & 0x7f) * mult;
        mult *= 128;
        if (!(d & 0x80)) { done = true; break; }
      }
      if (!done || i + len > all.length) break;  // wait for the rest of the packet
      this._handle(all[pos], all.subarray(i, i + len));
      pos = i + len;
    }
    this.buf = all.slice(pos);
  }

  _handle(first, body) {
    const type = first >> 4;
    if (type === 2) {  // CONNACK
      const rc = body[1];
      if (rc !== 0) {
        const why = {1: "unacceptable protocol version", 2: "client id rejected",
                     3: "server unavailable", 4: "bad user name or password",
                     5: "not authorized"}[rc] || "refused (" + rc + ")";
        this.closed = true;  // retrying with the same credentials cannot help
        this.opts.onState("refused", why);
        this.ws.close();
        return;
      }
      this.ws.send(this._subscribePacket());
      this.ping = setInterval(() => {
        if (this.ws.readyState === WebSocket.OPEN) this.ws.send(new Uint8Array([0xc0, 0]));
      }, this.opts.keepalive * 500);
      this.opts.onState("connected", this.url);
    } else if (type === 3) {  // PUBLISH
      const qos = (first >> 1) & 3, retained = (first & 1) === 1;
      const tlen = (body[0] << 8) | body[1];
      const topic = new TextDecoder().decode(body.subarray(2, 2 + tlen));
      let p = 2 + tlen;
      if (qos > 0) {  // we asked for QoS 0; acknowledge anyway if a broker sends more
        const ack = qos === 1 ? 0x40 : 0x50;
        this.ws.send(new Uint8Array([ack, 2, body[p], body[p + 1]]));
        p += 2;
      }
      let text;
      try {
        text = new TextDecoder("utf-8", {fatal: true}).decode(body.subarray(p));
      } catch (e) {
        return;  // not text (a tensor frame): not for us
      }
      this.opts.onMessage(topic, text, retained);
    } else if (type === 9) {  // SUBACK
      for (const rc of body.subarray(2)) {
        if (rc === 0x80) this.opts.onState("error", "the broker refused a subscription (ACL?)");
      }
    } else if (type === 6) {  // PUBREL of an unexpected QoS 2 message: complete it
      this.ws.send(new Uint8Array([0x70, 2, body[0], body[1]]));
    }
  }
}

if (typeof module !== "undefined") module.exports = {MqttSubscriber};
