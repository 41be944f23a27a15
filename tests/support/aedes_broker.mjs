// A private aedes 1.x MQTT broker for one test: `node aedes_broker.mjs PORT DATADIR`.
// Sessions, subscriptions and queued QoS 1 messages live in the store AEDES_PERSISTENCE names.
// Modules come from the project's .node/ (scripts/setup installs tests/support/node-brokers.json).
import net from 'node:net'
import path from 'node:path'
import { createRequire } from 'node:module'

const nodeDir = process.env.MQTTD_NODE_DIR
const require = createRequire(path.join(nodeDir, 'package.json'))
const { Aedes } = await import(require.resolve('aedes'))
const { Level } = require('level')
const aedesPersistenceLevel = require('aedes-persistence-level')

const port = Number(process.argv[2])
// AEDES_PERSISTENCE picks the session store:
//   redis:PORT  aedes-persistence-redis on a private redis-server (what the tests use: sessions
//               survive a broker restart, nothing lost); maxSessionDelivery raised from its 1,000
//               (queued messages delivered per CONNECT: the rest would wait for the next one)
//   level       aedes-persistence-level 9.2 (LevelDB under DATADIR): measured here to drop a few
//               QoS 1 messages to a connected subscriber (4 of 500 in one run): not used
//   memory      aedes' default (every session lost on a broker restart)
const mode = process.env.AEDES_PERSISTENCE || 'level'
let db = null
let persistence
if (mode.startsWith('redis:')) {
  const aedesPersistenceRedis = require('aedes-persistence-redis')
  persistence = aedesPersistenceRedis({ host: '127.0.0.1', port: Number(mode.slice(6)), maxSessionDelivery: 1000000 })
} else if (mode === 'level') {
  db = new Level(path.join(process.argv[3], 'aedes.level'), { valueEncoding: 'buffer' })
  persistence = aedesPersistenceLevel(db)
}
const broker = await Aedes.createBroker(persistence ? { persistence } : {})
const server = net.createServer(broker.handle)
server.listen(port, '127.0.0.1', () => console.log(`aedes ${port} up`))
const stop = () => server.close(() => broker.close(() => (db ? db.close() : Promise.resolve()).then(() => process.exit(0))))
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
