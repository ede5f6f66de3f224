// The Socket.IO side of pushgate-bench's comparison (`pushgate-bench socketio fanout`): one
// process of a Socket.IO cluster whose processes share broadcasts through the Redis adapter.
//
//   node server.js [PORT] [REDIS_URL]     (or PORT, REDIS_URL, HOST in the environment)
//
// Clients emit `join` (a room name) to join a room and `pub` ({room, data}) to broadcast `data`
// as a `msg` event to everyone in the room, on every process. Both answer an acknowledgement
// when the client asks for one, so the bench knows a subscriber is in the room before it
// publishes, and counts publishes the way it counts pushgate's acked ones. Prints
// `listening on PORT` once it accepts connections (PORT 0: any free port).
"use strict";

const { createServer } = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const port = Number(process.argv[2] ?? process.env.PORT ?? 3000);
const redisUrl = process.argv[3] ?? process.env.REDIS_URL ?? "redis://127.0.0.1:6379";
const host = process.env.HOST ?? "127.0.0.1";

async function main() {
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  for (const client of [pubClient, subClient]) {
    client.on("error", (e) => console.error(`redis: ${e.message}`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);

  // WebSocket only, as pushgate: no HTTP long-polling first and no upgrade.
  const io = new Server({ transports: ["websocket"], serveClient: false });
  io.adapter(createAdapter(pubClient, subClient));
  const ack = (callback) => typeof callback === "function" && callback();
  io.on("connection", (socket) => {
    socket.on("join", (room, callback) => {
      socket.join(String(room));
      ack(callback);
    });
    socket.on("pub", (message, callback) => {
      if (!message) return;
      io.to(String(message.room)).emit("msg", message.data);
      ack(callback);
    });
  });

  const http = createServer();
  io.attach(http);
  http.listen(port, host, () => console.log(`listening on ${http.address().port}`));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
