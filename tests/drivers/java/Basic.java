// pgjdbc basics: connect, a prepared statement past prepareThreshold, batch inserts, Statement.cancel().

import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Map;

public final class Basic {
    static long one(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static String connected(Connection conn) throws SQLException {
        int reported = conn.unwrap(org.postgresql.PGConnection.class).getBackendPID();
        long pid = one(conn, "SELECT pg_backend_pid()");
        return "{\"event\":\"connected\",\"pid\":" + pid + ",\"backend_pid\":" + reported
            + ",\"server_version\":" + Out.q(conn.getMetaData().getDatabaseProductVersion()) + "}";
    }

    static String prepared(Connection conn, int iterations) throws SQLException {
        int ok = 0;
        boolean before;
        boolean after;
        int threshold;
        try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int + 1, pg_backend_pid()")) {
            org.postgresql.PGStatement pgs = ps.unwrap(org.postgresql.PGStatement.class);
            threshold = pgs.getPrepareThreshold();
            before = pgs.isUseServerPrepare();
            for (int i = 0; i < iterations; i++) {
                ps.setInt(1, i);
                try (ResultSet rs = ps.executeQuery()) {
                    if (rs.next() && rs.getInt(1) == i + 1 && !rs.next()) {
                        ok++;
                    }
                }
            }
            after = pgs.isUseServerPrepare();
        }
        return "{\"event\":\"prepared\",\"iterations\":" + iterations + ",\"ok\":" + ok + ",\"threshold\":" + threshold
            + ",\"server_prepared_before\":" + before + ",\"server_prepared_after\":" + after + "}";
    }

    static int[] batch(Connection conn, String table, int from, int count) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement("INSERT INTO " + table + " (id, v) VALUES (?, ?)")) {
            for (int id = from; id < from + count; id++) {
                ps.setInt(1, id);
                ps.setString(2, "row " + id);
                ps.addBatch();
            }
            return ps.executeBatch();
        }
    }

    static String batches(Connection conn, String table) throws SQLException {
        StringBuilder sb = new StringBuilder("{\"event\":\"batch\"");
        try (Statement st = conn.createStatement()) {
            st.execute("DROP TABLE IF EXISTS " + table);
            st.execute("CREATE TABLE " + table + " (id int PRIMARY KEY, v text NOT NULL)");
        }
        int[] autocommit = batch(conn, table, 0, 300);  // autocommit: one implicit transaction
        conn.setAutoCommit(false);
        int[] committed = batch(conn, table, 300, 300);
        conn.commit();
        int[] rolledBack = batch(conn, table, 600, 300);
        conn.rollback();
        conn.setAutoCommit(true);
        String duplicate;
        try {
            batch(conn, table, 250, 100);  // 250..299 already exist
            duplicate = "null";
        } catch (BatchUpdateException e) {
            duplicate = Out.error(e.getNextException() != null ? e.getNextException() : e);
        }
        sb.append(",\"autocommit_counts\":").append(sum(autocommit)).append(",\"committed_counts\":").append(sum(committed))
          .append(",\"rolled_back_counts\":").append(sum(rolledBack)).append(",\"duplicate\":").append(duplicate)
          .append(",\"rows\":").append(one(conn, "SELECT count(*) FROM " + table))
          .append(",\"id_sum\":").append(one(conn, "SELECT sum(id) FROM " + table))
          .append(",\"text_ok\":").append(one(conn, "SELECT count(*) FROM " + table + " WHERE v = 'row ' || id"));
        try (Statement st = conn.createStatement()) {
            st.execute("DROP TABLE " + table);
        }
        return sb.append("}").toString();
    }

    static int sum(int[] counts) {
        int total = 0;
        for (int c : counts) {
            total += c == Statement.SUCCESS_NO_INFO ? 1 : c;
        }
        return total;
    }

    static String cancel(Connection conn, boolean prepared) throws Exception {
        Statement st = prepared ? conn.prepareStatement("SELECT pg_sleep(?)") : conn.createStatement();
        Thread canceller = new Thread(() -> {
            try {
                Thread.sleep(700);
                st.cancel();
            } catch (Exception e) {
                Out.emit("{\"event\":\"cancel_failed\",\"error\":" + Out.error(e) + "}");
            }
        });
        long t0 = System.nanoTime();
        canceller.start();
        String outcome;
        try {
            if (prepared) {
                ((PreparedStatement) st).setInt(1, 30);
                ((PreparedStatement) st).executeQuery();
            } else {
                st.executeQuery("SELECT pg_sleep(30)");
            }
            outcome = "null";
        } catch (SQLException e) {
            outcome = Out.error(e);
        }
        long ms = (System.nanoTime() - t0) / 1_000_000;
        canceller.join();
        st.close();
        long after = one(conn, "SELECT 41 + 1");
        return "{\"event\":\"cancel\",\"prepared\":" + prepared + ",\"error\":" + outcome + ",\"ms\":" + ms
            + ",\"after\":" + after + "}";
    }

    public static void main(String[] argv) throws Exception {
        Map<String, String> args = Out.args(argv);
        Out.watchdog(args);
        try (Connection conn = DriverManager.getConnection(Out.url(args))) {
            Out.emit(connected(conn));
            Out.emit(prepared(conn, Integer.parseInt(args.getOrDefault("iterations", "25"))));
            Out.emit(batches(conn, args.get("table")));
            Out.emit(cancel(conn, false));
            Out.emit(cancel(conn, true));
        } catch (Exception e) {
            Out.emit("{\"event\":\"crash\",\"error\":" + Out.error(e) + "}");
            System.exit(2);
        }
        Out.emit("{\"event\":\"done\"}");
        System.exit(0);
    }
}
