#!/usr/bin/env node
// The kafkajs producer of the conformance tests: a file of `key<TAB>value` lines (UTF-8) to a topic with kafkajs 2's
// default partitioner (DefaultPartitioner: Java-compatible murmur2 of the key), acks -1 (all in-sync replicas).
//
//   node tests/clients/kafkajs/produce.js BOOTSTRAP TOPIC FILE [none|gzip]
//
// A line without a tab is sent without a key. Sends in batches of BATCH records, one at a time (so each partition
// keeps the file's order), disconnects, prints the number of records sent. Exits 1 on a failure, 2 on bad arguments.
'use strict'

process.env.KAFKAJS_NO_PARTITIONER_WARNING = '1' // the v2 default partitioner is the one we want
const fs = require('fs')
const { Kafka, CompressionTypes, logLevel } = require('kafkajs')

const BATCH = 500
const CODECS = { none: CompressionTypes.None, gzip: CompressionTypes.GZIP }

async function main(argv) {
  const [bootstrap, topic, file, codecName = 'none'] = argv
  if (!file || !(codecName in CODECS)) {
    console.error('usage: produce.js BOOTSTRAP TOPIC FILE [none|gzip]')
    process.exit(2)
  }
  const messages = []
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    if (!line) continue
    const tab = line.indexOf('\t')
    const key = tab < 0 ? null : Buffer.from(line.slice(0, tab), 'utf8')
    messages.push({ key, value: Buffer.from(line.slice(tab + 1), 'utf8') })
  }
  const kafka = new Kafka({ clientId: 'conformance-kafkajs', brokers: bootstrap.split(','), logLevel: logLevel.ERROR })
  const producer = kafka.producer({ allowAutoTopicCreation: false })
  await producer.connect()
  let sent = 0
  try {
    for (let i = 0; i < messages.length; i += BATCH) {
      const chunk = messages.slice(i, i + BATCH)
      await producer.send({ topic, messages: chunk, acks: -1, compression: CODECS[codecName] })
      sent += chunk.length
    }
  } finally {
    await producer.disconnect()
  }
  console.log(String(sent))
}

main(process.argv.slice(2)).catch(err => {
  console.error(`kafkajs produce failed: ${err && err.stack ? err.stack : err}`)
  process.exit(1)
})
