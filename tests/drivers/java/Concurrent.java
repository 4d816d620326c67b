// pgjdbc with its default prepareThreshold (5) from many threads, one connection each, results checked.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;

public final class Concurrent {
    static final AtomicInteger ok = new AtomicInteger();
    static final AtomicInteger wrong = new AtomicInteger();
    static final AtomicInteger queryErrors = new AtomicInteger();
    static final AtomicInteger serverPrepared = new AtomicInteger();
    static final List<String> errors = new ArrayList<>();
    static final Set<Integer> servers = ConcurrentHashMap.newKeySet();  // every server pid q1 ran on
    static final AtomicInteger movedClients = new AtomicInteger();  // threads whose q1 ran on several servers
    static final List<String> failedClients = new ArrayList<>();

    static void record(List<String> list, String json) {
        synchronized (list) {
            if (list.size() < 20) {
                list.add(json);
            }
        }
    }

    static void check(boolean cond, String what) {
        if (cond) {
            ok.incrementAndGet();
        } else {
            wrong.incrementAndGet();
            record(errors, "{\"code\":\"WRONG\",\"message\":" + Out.q(what) + "}");
        }
    }

    static void client(String url, int id, int iterations) throws SQLException {
        String who = "t" + id;
        Set<Integer> mine = new HashSet<>();
        try (Connection conn = DriverManager.getConnection(url);
             PreparedStatement q1 = conn.prepareStatement("SELECT ?::int * 2, ?::text, pg_backend_pid()");
             PreparedStatement q3 = conn.prepareStatement("SELECT n FROM generate_series(1, ?) AS n");
             PreparedStatement q2 = conn.prepareStatement("SELECT ?::int + 1")) {
            for (int i = 0; i < iterations; i++) {
                try {
                    q1.setInt(1, i);
                    q1.setString(2, who);
                    try (ResultSet rs = q1.executeQuery()) {
                        boolean row = rs.next();
                        boolean right = row && rs.getInt(1) == 2 * i && who.equals(rs.getString(2));
                        if (row) {
                            mine.add(rs.getInt(3));
                        }
                        check(right && !rs.next(), "q1 " + who + " " + i);
                    }
                    int want = i % 5 + 1;
                    q3.setInt(1, want);
                    int rows = 0;
                    int last = 0;
                    try (ResultSet rs = q3.executeQuery()) {
                        while (rs.next()) {
                            rows++;
                            last = rs.getInt(1);
                        }
                    }
                    check(rows == want && last == want, "q3 " + who + " " + i + ": " + rows + " rows");
                    if (i % 4 == 3) {
                        conn.setAutoCommit(false);
                        q2.setInt(1, i);
                        int v2;
                        try (ResultSet rs = q2.executeQuery()) {
                            rs.next();
                            v2 = rs.getInt(1);
                        }
                        q1.setInt(1, i + 1);
                        q1.setString(2, who);
                        int v1;
                        try (ResultSet rs = q1.executeQuery()) {
                            rs.next();
                            v1 = rs.getInt(1);
                        }
                        conn.commit();
                        conn.setAutoCommit(true);
                        check(v2 == i + 1 && v1 == 2 * (i + 1), "tx " + who + " " + i);
                    }
                } catch (SQLException e) {
                    queryErrors.incrementAndGet();
                    record(errors, Out.error(e));
                    try {
                        if (!conn.getAutoCommit()) {
                            conn.rollback();
                            conn.setAutoCommit(true);
                        }
                    } catch (SQLException gone) {
                        // the connection may be gone; the next iteration reports it
                    }
                }
            }
            servers.addAll(mine);
            if (mine.size() > 1) {
                movedClients.incrementAndGet();
            }
            if (q1.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare()) {
                serverPrepared.incrementAndGet();
            }
        }
    }

    public static void main(String[] argv) throws Exception {
        Map<String, String> args = Out.args(argv);
        Out.watchdog(args);
        String url = Out.url(args);
        int clients = Integer.parseInt(args.get("clients"));
        int iterations = Integer.parseInt(args.get("iterations"));
        long started = System.nanoTime();
        List<Thread> threads = new ArrayList<>();
        for (int id = 0; id < clients; id++) {
            final int n = id;
            Thread t = new Thread(() -> {
                try {
                    client(url, n, iterations);
                } catch (Throwable e) {
                    record(failedClients, Out.error(e));
                }
            });
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) {
            t.join();
        }
        long ms = (System.nanoTime() - started) / 1_000_000;
        Out.emit("{\"event\":\"summary\",\"clients\":" + clients + ",\"iterations\":" + iterations
                 + ",\"ok\":" + ok.get() + ",\"wrong\":" + wrong.get() + ",\"query_errors\":" + queryErrors.get()
                 + ",\"server_prepared\":" + serverPrepared.get() + ",\"servers\":" + servers.size() + ",\"moved_clients\":" + movedClients.get()
                 + ",\"errors\":[" + String.join(",", errors) + "],\"failed_clients\":["
                 + String.join(",", failedClients) + "],\"ms\":" + ms + "}");
        Out.emit("{\"event\":\"done\",\"driver\":" + Out.q(org.postgresql.Driver.class.getPackage().getImplementationVersion()) + "}");
        System.exit(0);
    }
}
