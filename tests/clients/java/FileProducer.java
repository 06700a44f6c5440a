import java.io.BufferedReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * Produces a file of {@code key<TAB>value} lines (UTF-8) to a topic with Apache Kafka's own producer: the default
 * partitioner (murmur2 of the key), acks=all, plus any producer properties given as {@code name=value} arguments.
 *
 * <pre>
 *   java -cp '.deps/clients/java/*:.deps/clients/java/classes' FileProducer BOOTSTRAP TOPIC FILE [name=value ...]
 * </pre>
 *
 * A line without a tab is sent without a key. Prints the number of records sent and exits 0 once every one is
 * acknowledged; exits 1 on the first failed delivery, 2 on bad arguments.
 */
public final class FileProducer {
    public static void main(String[] args) throws Exception {
        if (args.length < 3) {
            System.err.println("usage: FileProducer BOOTSTRAP TOPIC FILE [name=value ...]");
            System.exit(2);
        }
        String topic = args[1];
        Properties props = new Properties();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        for (int i = 3; i < args.length; i++) {
            int eq = args[i].indexOf('=');
            if (eq <= 0) {
                System.err.println("not a name=value producer property: " + args[i]);
                System.exit(2);
            }
            props.put(args[i].substring(0, eq), args[i].substring(eq + 1));
        }

        AtomicReference<Exception> failure = new AtomicReference<>();
        AtomicLong acked = new AtomicLong();
        long sent = 0;
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(props);
             BufferedReader in = Files.newBufferedReader(Paths.get(args[2]), StandardCharsets.UTF_8)) {
            String line;
            while ((line = in.readLine()) != null && failure.get() == null) {
                if (line.isEmpty()) {
                    continue;
                }
                int tab = line.indexOf('\t');
                byte[] key = tab < 0 ? null : line.substring(0, tab).getBytes(StandardCharsets.UTF_8);
                byte[] value = line.substring(tab + 1).getBytes(StandardCharsets.UTF_8);
                producer.send(new ProducerRecord<>(topic, key, value), (metadata, exc) -> {
                    if (exc != null) {
                        failure.compareAndSet(null, exc);
                    } else {
                        acked.incrementAndGet();
                    }
                });
                sent++;
            }
            producer.flush();
        }
        if (failure.get() != null || acked.get() != sent) {
            System.err.println("delivery failed after " + acked.get() + " of " + sent + " records: " + failure.get());
            System.exit(1);
        }
        System.out.println(sent);
    }
}
