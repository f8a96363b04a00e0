// berthd over its unix socket with Node's @grpc/grpc-js and its default options
// (tests/interop.rs).
//
//     node client.js PROTO_DIR SOCKET IMAGE PULL_SECRET
//
// Calls grpc.health.v1.Health/Check (by method path, raw bytes), berth.v1.Agent/ListContainers
// and the server-streaming berth.v1.Agent/PullImage (protos loaded from PROTO_DIR with
// @grpc/proto-loader) on unix://SOCKET, and prints one JSON object with what came back.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [protoDir, socket, image, pullSecret] = process.argv.slice(2);

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(call) {
  return new Promise((resolve, reject) => call((err, answer) => (err ? reject(err) : resolve(answer))));
}

async function main() {
  const definition = protoLoader.loadSync(path.join(protoDir, 'berth/v1/agent.proto'), {
    includeDirs: [protoDir],
    keepCase: true,
    defaults: true,
    oneofs: true,
  });
  const berth = grpc.loadPackageDefinition(definition).berth.v1;
  const target = `unix://${socket}`;
  const result = { grpcjs: require('@grpc/grpc-js/package.json').version };

  const raw = new grpc.Client(target, grpc.credentials.createInsecure());
  const identity = (buffer) => buffer;
  // HealthCheckRequest{service: ""} is empty; the answer is field 1 (varint).
  const answer = await unary((done) =>
    raw.makeUnaryRequest('/grpc.health.v1.Health/Check', identity, identity, Buffer.alloc(0),
      { deadline: deadline(30) }, done));
  result.health = answer[0] === 0x08 ? answer[1] : 0;
  raw.close();

  const agent = new berth.Agent(target, grpc.credentials.createInsecure());
  const listed = await unary((done) =>
    agent.ListContainers({ project: 'default' }, { deadline: deadline(30) }, done));
  result.containers = listed.containers.length;

  result.pull = await new Promise((resolve, reject) => {
    const events = [];
    const stream = agent.PullImage({ project: 'default', image, pull_secret: pullSecret },
      { deadline: deadline(120) });
    stream.on('data', (event) => {
      events.push(event.event);
      if (event.event === 'done') result.digest = event.done.digest;
    });
    stream.on('error', reject);
    stream.on('end', () => resolve(events));
  });
  agent.close();
  console.log(JSON.stringify(result));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
